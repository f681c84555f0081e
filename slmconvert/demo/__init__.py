"""A seeded synthetic multi-agent log for the quickstart and the tests (`slmconvert demo-data`)."""

from slmconvert.demo.generator import generate

__all__ = ["generate"]
