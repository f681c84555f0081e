from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from slmconvert.cli import app
from slmconvert.cli._common import ConfigOpt, ForceOpt, JsonOpt, RichProgress, SetOpt, WorkspaceOpt, console, handle_errors, load, print_json


@app.command("select")
@handle_errors
def select_(
    workspace: Optional[Path] = WorkspaceOpt,
    memory_budget_gb: Optional[float] = typer.Option(None, "--memory-gb", help="Memory available to train one model (GB)."),
    no_probe: bool = typer.Option(False, "--no-probe", help="Do not load and probe models: rank the eligible, available ones by the catalogue (smallest first, native tool calling first where needed)."),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    force: bool = ForceOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Pick candidate SLMs per call site: catalogue constraints, then a zero-/few-shot probe of the models available here (paper step S4).

    Writes WS/candidates/candidates.json: ranked candidates with probe scores, and the reason for every model left out.
    """
    extra = []
    if memory_budget_gb is not None:
        extra.append(f"select.memory_budget_gb={memory_budget_gb}")
    if no_probe:
        extra.append("select.probe=false")
    cfg, ws = load(config, set_, workspace, extra)

    from slmconvert.select.stage import CANDIDATES, load_candidates, run

    m = run(cfg, ws, force=force, progress=RichProgress(not as_json))
    doc = load_candidates(ws)
    path = ws.stage_dir("select") / CANDIDATES
    if as_json:
        print_json({"status": m.status, "counts": m.counts, "candidates": m.extra.get("candidates", {}), "file": str(path)})
        return
    from rich.table import Table

    for site in doc["sites"].values():
        t = Table("rank", "model", "probe score", "zero-shot", "few-shot", "tool format", "params",
                  title=f"call site {site['site']}: p95 prompt ~{site['p95_prompt_tokens']:,} tokens after compaction"
                        f"{', needs tool calls' if site['needs_tools'] else ''}", title_justify="left")
        for c in site["ranked"]:
            p = c["probe"]
            if p is None:  # ranked by the catalogue (--no-probe)
                t.add_row(str(c["rank"]), c["model"], "—", "—", "—", "native" if c["tool_calling"] else "—", f"{c['params_b']:g}B")
                continue
            t.add_row(str(c["rank"]), c["model"], f"{c['score']:.3f}", f"{p['zero_shot']['score']:.3f}",
                      f"{p['few_shot']['score']:.3f}" if "few_shot" in p else "—", p["tool_format"], f"{c['params_b']:g}B")
        console.print(t)
        if site.get("ranked_by"):
            console.print(f"ranked by {site['ranked_by']}", highlight=False)
        for key, label in (("not_probed", "not probed"), ("unavailable", "not available"), ("excluded", "excluded")):
            items = site[key]
            if items:
                console.print(f"[bold]{label}[/] ({len(items)}):", highlight=False)
                for x in items:
                    console.print(f"  {x['model']}: {x['reason']}", highlight=False, soft_wrap=True)
        if site.get("warning"):
            console.print(f"[yellow]warning:[/] {site['warning']}")
    console.print(f"select: {m.status}; candidates → {path}", highlight=False)
