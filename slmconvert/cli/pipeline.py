from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from slmconvert.cli import app
from slmconvert.cli._common import RichProgress, SetOpt, WorkspaceOpt, console, err_console, handle_errors, load, print_json


@app.command()
@handle_errors
def validate(
    file: Path = typer.Argument(..., help="A pipeline YAML (pipelines/) or a catalogue/policy file (configs/)."),
    set_: Optional[list[str]] = SetOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the resolved configuration as JSON."),
) -> None:
    """Check a pipeline or config file: every unknown key and bad value is reported at once, with its key path."""
    from slmconvert.config import build_config, load_yaml
    from slmconvert.validation import check_pipeline, validate_config_file

    data = load_yaml(file)
    resolved = validate_config_file(file, data, set_ or [])
    if data.get("kind") is None:  # a pipeline: what it refers to must exist too (logs, policy, models, ...)
        check_pipeline(build_config(resolved, str(file)), str(file))
    if as_json:
        print_json(resolved)
        return
    console.print(f"[green]OK[/] {file}", highlight=False)


@app.command()
@handle_errors
def run(
    pipeline: Path = typer.Argument(..., help="Pipeline YAML, e.g. pipelines/quickstart.yaml."),
    workspace: Optional[Path] = WorkspaceOpt,
    from_: Optional[str] = typer.Option(None, "--from", help="First stage to run."),
    until: Optional[str] = typer.Option(None, "--until", help="Last stage to run."),
    force: bool = typer.Option(False, "--force", help="Re-run every selected stage even when unchanged."),
    set_: Optional[list[str]] = SetOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the per-stage results as JSON."),
) -> None:
    """Run the conversion pipeline; a stage whose inputs and config are unchanged is skipped (paper step S6)."""
    from slmconvert.pipeline import run_pipeline

    cfg, ws = load(pipeline, set_, workspace)
    t0 = time.perf_counter()
    results = run_pipeline(cfg, ws, start=from_, stop=until, force=force, progress=RichProgress(not as_json),
                           on_stage=None if as_json else _announce, source=str(pipeline))
    evaluated = any(r["stage"] == "evaluate" for r in results) and ws.read_manifest("evaluate") is not None
    summary = None
    if evaluated:
        from slmconvert.evaluate.stage import load_summary

        summary = load_summary(ws)
    if as_json:
        print_json({"workspace": str(ws.root), "stages": results, "total_s": round(time.perf_counter() - t0, 2),
                    "headline": summary["headline"] if summary else None,
                    "report": str(ws.stage_dir("evaluate") / "report.html") if summary else None})
        return
    from rich.table import Table

    t = Table("stage", "status", "seconds", "result", title=f"slmconvert run {pipeline}")
    for r in results:
        t.add_row(r["stage"], r["status"], f"{r['seconds']:.1f}", r["summary"])
    console.print(t)
    if summary:
        from slmconvert.cli.evaluate import print_verdicts

        print_verdicts(summary, "verdicts per task (test split)")
        console.print(f"report: {ws.stage_dir('evaluate') / 'report.html'}", highlight=False)
    console.print(f"workspace: {ws.root}  (total {time.perf_counter() - t0:.1f} s; this iteration is recorded in "
                  f"{ws.root / 'iterations.jsonl'})", highlight=False)


def _announce(stage: str) -> None:
    err_console.print(f"[bold]→ {stage}[/]")
