from __future__ import annotations

from pathlib import Path

import typer

from slmconvert.cli import app
from slmconvert.cli._common import (
    ConfigOpt,
    ForceOpt,
    JsonOpt,
    RichProgress,
    SetOpt,
    WorkspaceOpt,
    console,
    handle_errors,
    load,
    print_json,
)


@app.command()
@handle_errors
def cluster(
    workspace: Path | None = WorkspaceOpt,
    embedding_model: str | None = typer.Option(None, "--embedding-model", help="sentence-transformers model: hub id, folder, or pypi:PACKAGE/PATH."),
    test_fraction: float | None = typer.Option(None, "--test-fraction", help="Share of sessions held out for evaluation."),
    config: Path | None = ConfigOpt,
    set_: list[str] | None = SetOpt,
    force: bool = ForceOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Find the agent's call sites and recurring tasks, split train/test by session, and learn a router (paper step S3).

    Writes WS/clusters/: assignments.parquet, tasks.json, router.joblib, report.html.
    Embeddings are cached: a re-run embeds only texts it has not seen.
    """
    extra = []
    if embedding_model:
        extra.append(f"cluster.embedding_model={embedding_model}")
    if test_fraction is not None:
        extra.append(f"cluster.test_fraction={test_fraction}")
    cfg, ws = load(config, set_, workspace, extra)

    from slmconvert.cluster.stage import REPORT, load_tasks, run

    m = run(cfg, ws, force=force, progress=RichProgress(not as_json))
    doc = load_tasks(ws)
    report = ws.stage_dir("cluster") / REPORT
    if as_json:
        print_json({"status": m.status, "counts": m.counts, "router_test_accuracy": m.extra.get("router_test_accuracy"),
                    "warnings": m.extra.get("warnings", []), "report": str(report), "workspace": str(ws.root),
                    "tasks": [{k: t[k] for k in ("site", "task", "label", "size", "share_calls", "train", "test")}
                              for s in doc["sites"].values() for t in s["tasks"]]})
        return
    from rich.table import Table

    est = " (est.)" if doc["totals"].get("tokens_estimated") else ""
    for s in doc["sites"].values():
        t = Table("task", "label", "calls", "share", f"prompt tokens{est}", "train/test",
                  title=f"call site {s['site']}: {s['size']:,} calls, {len(s['tasks'])} tasks", title_justify="left")
        for task in s["tasks"]:
            t.add_row(task["task"], task["label"], f"{task['size']:,}", f"{100 * task['share_calls']:.1f}%",
                      f"{100 * task['share_prompt_tokens']:.1f}%", f"{task['train']}/{task['test']}")
        console.print(t)
    console.print(f"cluster: {m.status} — {m.counts['sites']} call site(s), {m.counts['tasks']} task(s)", highlight=False)
    acc = m.extra.get("router_test_accuracy")
    console.print(f"router test accuracy: {'n/a' if acc is None else f'{acc:.3f}'}; split by session: "
                  f"{m.counts['train']:,} train / {m.counts['test']:,} test invocations; "
                  f"embedded {m.counts['embedded_new']:,} new, {m.counts['embedded_cached']:,} cached", highlight=False)
    for w in m.extra.get("warnings", []):
        console.print(f"[yellow]warning:[/] {w}", highlight=False)
    console.print(f"report: {report}", highlight=False)
