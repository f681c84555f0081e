"""slmconvert: turn an LLM-powered agent into one that runs mostly on small language models."""

__version__ = "0.1.0"
