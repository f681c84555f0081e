"""Stage S1: ingest an agent's logged LLM calls into normalised invocations."""

from slmconvert.collect.stage import run

__all__ = ["run"]
