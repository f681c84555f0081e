"""Shared CLI plumbing: consoles, error handling, config loading, a rich progress reporter.

Nothing here imports heavy libraries: `--help` must stay instant.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape

from slmconvert.errors import SlmconvertError
from slmconvert.progress import Progress

console = Console()
err_console = Console(stderr=True, soft_wrap=True)

WorkspaceOpt = typer.Option(None, "--workspace", "-w", help="Workspace folder (default: the pipeline's, else ./workspace).")
ConfigOpt = typer.Option(None, "--config", "-c", help="Pipeline YAML file (see pipelines/).", exists=False)
SetOpt = typer.Option(None, "--set", help="Override a config key: --set collect.strict=true (repeatable).")
ForceOpt = typer.Option(False, "--force", help="Re-run even when inputs and config are unchanged.")
JsonOpt = typer.Option(False, "--json", help="Print one JSON object on stdout instead of tables.")


def handle_errors(fn: Callable) -> Callable:
    """User errors become one clear message and a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SlmconvertError as e:
            err_console.print(f"[bold red]Error:[/] {e}", highlight=False, markup=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]Interrupted.[/] Nothing half-written was kept; run the same command again to resume.")
            raise typer.Exit(130) from None
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                what = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
                        errno.EFBIG: "file size limit reached"}[e.errno]
                err_console.print(f"[bold red]Error:[/] {what} while writing {e.filename or 'the workspace'}; "
                                  "free some space and re-run (finished stages are kept).")
                raise typer.Exit(28) from None
            if e.errno in (errno.EACCES, errno.EROFS):
                err_console.print(f"[bold red]Error:[/] cannot write {e.filename}: {e.strerror}")
                raise typer.Exit(13) from None
            err_console.print("[bold red]Error:[/] " + escape(f"{e.strerror or e}{': ' + str(e.filename) if e.filename else ''}"),
                              highlight=False)
            raise typer.Exit(74) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - the last line of defence: a bug is reported, not dumped
            if os.environ.get("SLMCONVERT_DEBUG"):
                raise
            first = str(e).splitlines()[0][:300] if str(e).strip() else ""
            err_console.print("[bold red]Error:[/] " + escape(f"unexpected {type(e).__name__}: {first}\n"
                              "This is a bug in slmconvert; please report it. Set SLMCONVERT_DEBUG=1 to see the traceback."),
                              highlight=False)
            raise typer.Exit(70) from None

    return wrapper


def load(config_path: Optional[Path], overrides: Optional[list[str]], workspace: Optional[Path], extra: Optional[list[str]] = None):
    """Config from file + overrides (+ CLI options expressed as overrides), and its workspace."""
    from slmconvert.config import load_config
    from slmconvert.workspace import Workspace

    sets = list(overrides or []) + list(extra or [])
    if workspace is not None:
        sets.append(f"workspace={json.dumps(str(workspace))}")
    config = load_config(config_path, sets)
    return config, Workspace(config.workspace)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


class RichProgress(Progress):
    """A transient rich progress bar on stderr (stdout stays clean for --json)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and err_console.is_terminal
        self._progress = None
        self._task = None

    def start(self, label: str, total: float | None = None) -> None:
        if not self.enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RP, TextColumn, TimeElapsedColumn

        self.stop()
        self._progress = RP(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=err_console, transient=True)
        self._progress.start()
        self._task = self._progress.add_task(label, total=total)

    def advance(self, n: float = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def describe(self, label: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=label)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
