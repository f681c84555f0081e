"""Errors that reach the user. The CLI prints their message and exits non-zero, without a traceback."""


class SlmconvertError(Exception):
    """An error the user can act on: the message says what went wrong and where."""

    exit_code = 1


class ConfigError(SlmconvertError):
    """A pipeline file or an override is invalid. `problems` lists every one, each with its key path."""

    exit_code = 2

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"{source}: {len(problems)} {noun}\n{lines}")


class FormatError(SlmconvertError):
    """A log file matches no known format, or a format cannot read it at all."""

    exit_code = 3


class StageError(SlmconvertError):
    """A stage cannot run: missing input stage, empty input, unusable workspace."""

    exit_code = 4


class ModelNotFound(SlmconvertError):
    """A model that cannot be loaded: the message names the model, where it was looked for, and how to get it."""

    exit_code = 5

    def __init__(self, model: str, source: str, hint: str):
        self.model, self.source, self.hint = model, source, hint
        super().__init__(f"model {model!r} is not available from {source}: {hint}")
