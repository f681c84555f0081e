"""The SLM catalogue and model loading (hub id, local folder, GGUF shipped in a Python package)."""
