from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from slmconvert.cli import app
from slmconvert.cli._common import ConfigOpt, JsonOpt, SetOpt, WorkspaceOpt, console, handle_errors, load, print_json


@app.command("export")
@handle_errors
def export_cmd(
    out: Path = typer.Argument(..., help="Folder to write the export to (created; must be empty unless --force)."),
    to: str = typer.Option(..., "--to", help="vllm | llamacpp | ollama | merged."),
    workspace: Optional[Path] = WorkspaceOpt,
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    as_json: bool = JsonOpt,
) -> None:
    """Package each call site's SLM for a serving engine: vLLM LoRA modules, llama.cpp GGUF LoRAs, Ollama
    Modelfiles, or merged Hugging Face models; with the commands to start them, the routing policy and a manifest."""
    from slmconvert.export import export

    cfg, ws = load(config, set_, workspace, [])
    manifest = export(ws, to, out, cfg, force=force)
    if as_json:
        print_json({k: v for k, v in manifest.items() if k != "files"} | {"files": len(manifest["files"]), "out": str(out)})
        return
    console.print(f"exported {len(manifest['sites'])} call site(s) for {to} to {out} ({len(manifest['files'])} files); "
                  f"start with the commands in {out / 'README.md'}", highlight=False)
    for site, info in sorted(manifest["sites"].items()):
        console.print(f"  {site} → {info['model']}", highlight=False)
