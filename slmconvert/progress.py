"""Progress reporting that stages can call without knowing about the terminal."""

from __future__ import annotations


class Progress:
    """No-op reporter; the CLI passes a rich-backed one. Stages call `start`, `advance`, `stop`."""

    def start(self, label: str, total: float | None = None) -> None:
        pass

    def advance(self, n: float = 1) -> None:
        pass

    def stop(self) -> None:
        pass

    def describe(self, label: str) -> None:
        """Replace the running bar's label (e.g. with the current loss)."""


NULL_PROGRESS = Progress()
