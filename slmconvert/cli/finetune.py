from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from slmconvert.cli import app
from slmconvert.cli._common import ConfigOpt, ForceOpt, JsonOpt, RichProgress, SetOpt, WorkspaceOpt, console, handle_errors, load, print_json


@app.command()
@handle_errors
def finetune(
    workspace: Optional[Path] = WorkspaceOpt,
    model: Optional[list[str]] = typer.Option(None, "--model", "-m", help="Train this model (catalogue name, folder, hub id or pypi:...) instead of select's candidates. Repeatable."),
    method: Optional[str] = typer.Option(None, "--method", help="lora | qlora (4-bit base, CUDA) | full."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after N optimizer steps."),
    merge: bool = typer.Option(False, "--merge", help="Also save the base model with the adapter merged in, beside it (for every chosen adapter at once: slmconvert export --to merged)."),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    force: bool = ForceOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Distil the LLM's logged responses into each call site's candidate SLMs with LoRA/QLoRA (paper step S5).

    One adapter per (site, model) in WS/models/<site>/<model>/. An interrupted run resumes from its last
    checkpoint; finished adapters are skipped. Multi-GPU: `accelerate launch -m slmconvert finetune ...`.
    """
    import json

    extra = []
    if model:
        extra.append(f"finetune.models={json.dumps(list(model))}")
    if method:
        extra.append(f"finetune.method={method}")
    if max_steps is not None:
        extra.append(f"finetune.max_steps={max_steps}")
    if merge:
        extra.append("finetune.merge=true")
    cfg, ws = load(config, set_, workspace, extra)

    from slmconvert.finetune.stage import run

    m = run(cfg, ws, force=force, progress=RichProgress(not as_json))
    if as_json:
        print_json({"status": m.status, "counts": m.counts, "adapters": m.extra.get("adapters", []),
                    "warnings": m.extra.get("warnings", []), "workspace": str(ws.root)})
        return
    from rich.table import Table

    t = Table("site", "model", "status", "examples", "loss first → last", "tokens/s", "minutes", "path",
              title=f"finetune: {m.status}")
    for a in m.extra.get("adapters", []):
        t.add_row(a["site"], a["model"], a["status"] + (f" (resumed {a['resumed_from']})" if a.get("resumed_from") else ""),
                  str(a["examples"]), f"{a['first_loss']} → {a['last_loss']}", f"{a['tokens_per_s'] or 0:.0f}",
                  f"{a['seconds'] / 60:.1f}", a["path"])
    console.print(t)
    for w in m.extra.get("warnings", []):
        console.print(f"[yellow]warning:[/] {w}", highlight=False)
