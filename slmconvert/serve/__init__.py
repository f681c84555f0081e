"""`serve`: the heterogeneous agent — SLM first where evaluation allows, the LLM otherwise, every call logged."""
