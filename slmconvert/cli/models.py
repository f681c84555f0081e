from __future__ import annotations

from typing import Optional

import typer

from slmconvert.cli import app
from slmconvert.cli._common import JsonOpt, console, handle_errors, print_json

models_app = typer.Typer(help="The SLM catalogue (configs/models.yaml): list, show.", no_args_is_help=True)
app.add_typer(models_app, name="models")

CatalogueOpt = typer.Option(None, "--catalogue", help="Catalogue YAML (default: configs/models.yaml).")


def _entry_json(e, av) -> dict:
    return {**e.model_dump(mode="json"), "available": av.available, "available_from": av.source, "availability": av.reason}


@models_app.command("list")
@handle_errors
def list_models(catalogue: Optional[str] = CatalogueOpt, as_json: bool = JsonOpt) -> None:
    """List the catalogue: size, licence, context, tool calling, memory, and whether it can be loaded here."""
    from slmconvert.models.catalogue import load_catalogue
    from slmconvert.models.loading import availability

    cat = load_catalogue(catalogue)
    rows = [(e, availability(e)) for e in cat.models]
    if as_json:
        print_json([_entry_json(e, av) for e, av in rows])
        return
    from rich.table import Table

    t = Table(title=f"{len(rows)} models")
    t.add_column("name", no_wrap=True)
    for col in ("params", "licence", "context", "tools", "GB bf16/4-bit", "here"):
        t.add_column(col)
    for e, av in rows:
        tools = {True: "native", False: "fallback", None: "?"}[e.tool_calling]
        t.add_row(e.name, f"{e.params_b:g}B", e.licence, f"{e.context_length:,}" if e.context_length else "?", tools,
                  f"{e.memory('bf16'):.2f}/{e.memory('int4'):.2f}",
                  f"[green]{av.source}[/]" if av.available else "[dim]no[/]")
    console.print(t)
    console.print("tools: native = the chat template renders tool calls; fallback = slmconvert's <tool_call> format. "
                  "here: loadable now from a package, a folder or the local Hugging Face cache; no: not on this machine "
                  "(select.download: true lets select fetch hub models).", highlight=False)


@models_app.command("show")
@handle_errors
def show_model(name: str = typer.Argument(..., help="Catalogue name or alias."), catalogue: Optional[str] = CatalogueOpt,
               as_json: bool = JsonOpt) -> None:
    """Everything the catalogue knows about one model, with the source of each published score."""
    from slmconvert.models.catalogue import load_catalogue
    from slmconvert.models.loading import availability

    e = load_catalogue(catalogue).get(name)
    av = availability(e)
    if as_json:
        print_json(_entry_json(e, av))
        return
    lines = [f"[bold]{e.name}[/] ({e.family}){' aliases: ' + ', '.join(e.aliases) if e.aliases else ''}",
             f"parameters      {e.params_b:g} B", f"licence         {e.licence}",
             f"context         {e.context_length:,} tokens" if e.context_length else "context         unknown",
             f"tool calling    {({True: 'native (chat template)', False: 'fallback format', None: 'unknown'})[e.tool_calling]}",
             f"memory          {e.memory('bf16'):.2f} GB at bf16, {e.memory('int4'):.2f} GB at 4-bit (weights only)",
             f"LoRA targets    {', '.join(e.lora_target_modules) if e.lora_target_modules else 'unknown (peft picks all linear layers)'}",
             "sources         " + ", ".join(f"{k}: {v}" for k, v in e.sources.model_dump().items() if v),
             f"available here  {'yes, from ' + av.reason if av.available else 'no — ' + av.reason}"]
    for s in e.scores:
        lines.append(f"score           {s.benchmark} {s.value:g}  ({s.source})")
    console.print("\n".join(lines), highlight=False)
