from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from slmconvert.cli import app
from slmconvert.cli._common import ConfigOpt, ForceOpt, JsonOpt, RichProgress, SetOpt, WorkspaceOpt, console, handle_errors, load, print_json


@app.command()
@handle_errors
def scrub(
    workspace: Optional[Path] = WorkspaceOpt,
    policy: Optional[str] = typer.Option(None, "--policy", help="Policy name in configs/scrub/ (default, strict) or a YAML path."),
    placeholders: bool = typer.Option(False, "--placeholders", help="Typed placeholders (<PERSON_1>) instead of realistic fakes."),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    force: bool = ForceOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Scrub PII, PHI and secrets out of a workspace's invocations into WS/scrubbed/ (paper step S2).

    `collect` already scrubs by default; use this on a workspace collected with --no-scrub, or
    to re-scrub with another policy. The report is WS/scrubbed/scrub_report.json.
    """
    extra = []
    if policy:
        extra.append(f"scrub.policy={policy}")
    if placeholders:
        extra.append("scrub.surrogates=placeholder")
    cfg, ws = load(config, set_, workspace, extra)

    from slmconvert.io import read_json
    from slmconvert.scrub.stage import REPORT_FILE, run

    m = run(cfg, ws, force=force, progress=RichProgress(not as_json))
    if as_json:
        print_json({"status": m.status, **m.counts, "entities": m.extra.get("entities", {}),
                    "report": str(ws.stage_dir("scrub") / REPORT_FILE), "workspace": str(ws.root)})
        return
    from rich.table import Table

    report = read_json(ws.stage_dir("scrub") / REPORT_FILE)
    t = Table("entity", "action", "values", "replaced", "kept (detected, left)", title=f"scrub: {m.status}")
    for name, e in report["entities"].items():
        t.add_row(name, e["action"], f"{e['values']:,}", f"{e['replaced']:,}", f"{e['kept']:,}")
    console.print(t)
    console.print(f"{m.counts['invocations']:,} invocations scrubbed, {m.counts['dropped_scrub_policy']} dropped by policy; "
                  f"report: {ws.stage_dir('scrub') / REPORT_FILE}", highlight=False)
