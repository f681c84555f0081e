"""Candidate SLMs per call site (paper step S4)."""
