"""The `slmconvert` command. One module per command group; heavy imports live inside commands."""

from __future__ import annotations

import typer

from slmconvert import __version__

app = typer.Typer(
    name="slmconvert",
    help="Turn an LLM-powered agent into one that runs mostly on small language models "
    "(collect → scrub → cluster → select → finetune → evaluate).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"slmconvert {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
) -> None:
    pass


from slmconvert.cli import cluster as _cluster  # noqa: E402,F401
from slmconvert.cli import collect as _collect  # noqa: E402,F401
from slmconvert.cli import demo as _demo  # noqa: E402,F401
from slmconvert.cli import evaluate as _evaluate  # noqa: E402,F401
from slmconvert.cli import export as _export  # noqa: E402,F401
from slmconvert.cli import finetune as _finetune  # noqa: E402,F401
from slmconvert.cli import models as _models  # noqa: E402,F401
from slmconvert.cli import pipeline as _pipeline  # noqa: E402,F401
from slmconvert.cli import scrub as _scrub  # noqa: E402,F401
from slmconvert.cli import select as _select  # noqa: E402,F401
from slmconvert.cli import serve as _serve  # noqa: E402,F401


def main() -> None:
    app()
