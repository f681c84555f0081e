"""Call sites, tasks, the train/test split and the router (paper step S3)."""
