from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from slmconvert.cli import app
from slmconvert.cli._common import (
    ConfigOpt, ForceOpt, JsonOpt, RichProgress, SetOpt, WorkspaceOpt, console, err_console, handle_errors, load, print_json,
)


@app.command()
@handle_errors
def collect(
    paths: Optional[list[Path]] = typer.Argument(None, help="Log files or folders (default: collect.paths of the pipeline)."),
    workspace: Optional[Path] = WorkspaceOpt,
    format: Optional[str] = typer.Option(None, "--format", "-f", help="Log format (default: auto-detect per file). See `slmconvert formats`."),
    tools: Optional[Path] = typer.Option(None, "--tools", help="JSON file of tool schemas; overrides tools inferred from the calls."),
    strict: bool = typer.Option(False, "--strict", help="Exit non-zero, storing nothing, if any record is bad."),
    no_scrub: bool = typer.Option(False, "--no-scrub", help="Store raw PII (scrubbing OFF). Only for data you may keep as is."),
    agent: Optional[str] = typer.Option(None, "--agent", help="Agent name for invocations whose log has none."),
    model: Optional[str] = typer.Option(None, "--model", help="LLM name for invocations whose log does not say (e.g. gpt-4o)."),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    force: bool = ForceOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Ingest an agent's logged LLM calls into normalised invocations (paper step S1).

    Bad records are quarantined with their file, line and reason (WS/invocations/quarantine.jsonl);
    a second run over unchanged files is a no-op, and new or appended files add only what is new.
    """
    extra = []
    if paths:
        extra.append("collect.paths=" + json.dumps([str(p) for p in paths]))
    for key, val in (("format", format), ("tools_file", tools), ("agent", agent), ("model", model)):
        if val is not None:
            extra.append(f"collect.{key}={json.dumps(str(val))}")
    if strict:
        extra.append("collect.strict=true")
    if no_scrub:
        extra.append("scrub.enabled=false")
    cfg, ws = load(config, set_, workspace, extra)
    if not cfg.scrub.enabled:
        err_console.print("[bold yellow]Warning:[/] scrubbing is OFF: raw PII and secrets in these logs will be stored in "
                          f"{ws.root}.")

    from slmconvert.collect.stage import run, summary

    manifest = run(cfg, ws, force=force, progress=RichProgress(not as_json))
    result = summary(manifest, ws)
    if as_json:
        print_json(result)
        return
    _print_summary(result, manifest)


def _print_summary(result: dict, manifest) -> None:
    from rich.table import Table

    title = "collect: skipped (inputs and config unchanged)" if manifest.skipped else f"collect: {manifest.status}"
    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("what")
    t.add_column("count", justify="right")
    for key in ("invocations", "tool_calls", "text", "sessions", "new_invocations", "duplicates", "quarantined"):
        t.add_row(key.replace("_", " "), f"{result[key]:,}")
    t.add_row("tools", str(len(result["tools"])))
    console.print(t)
    if result["tools"]:
        console.print("tools: " + ", ".join(result["tools"]), highlight=False)
    drops = {k: v for k, v in manifest.counts.items() if k.startswith("dropped_") and v}
    if drops:
        console.print("dropped: " + ", ".join(f"{k[8:]}={v}" for k, v in sorted(drops.items())), highlight=False)
    if result["quarantined"]:
        console.print(f"[yellow]{result['quarantined']} bad record(s)[/] quarantined with reasons in "
                      f"{Path(result['workspace']) / 'invocations' / 'quarantine.jsonl'}")
    if not result["scrubbed"]:
        console.print("[yellow]not scrubbed[/]: run `slmconvert scrub` before sharing or training.")
    else:
        ents = manifest.extra.get("scrub", {}).get("entities", {})
        shown = ", ".join(f"{k} {v:,}" for k, v in sorted(ents.items(), key=lambda kv: -kv[1])) or "nothing found"
        console.print(f"scrubbed ({manifest.extra['scrub'].get('policy', 'default')} policy), values replaced: {shown}; "
                      "report: invocations/scrub_report.json", highlight=False)
    total = manifest.timings.get("total_s")
    if total is not None and not manifest.skipped:
        console.print(f"workspace: {result['workspace']}  ({total:.2f} s)", highlight=False)


@app.command()
@handle_errors
def formats(as_json: bool = JsonOpt) -> None:
    """List the log formats `collect` reads (auto-detected in this order)."""
    from slmconvert.collect.formats import format_names, log_formats

    names = format_names()
    rows = [{"name": n, "description": log_formats.get(n).description} for n in names]
    if as_json:
        print_json(rows)
        return
    from rich.table import Table

    t = Table("format", "what it reads")
    for r in rows:
        t.add_row(r["name"], r["description"])
    console.print(t)
