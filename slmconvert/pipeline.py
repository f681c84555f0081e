"""Run the stages of a pipeline in order; each one skips itself when its inputs and config are unchanged."""

from __future__ import annotations

import time
from typing import Any, Callable

from slmconvert.config import PipelineConfig
from slmconvert.errors import StageError
from slmconvert.progress import NULL_PROGRESS, Progress
from slmconvert.workspace import Workspace

# Stages implemented so far, in pipeline order. `scrub` runs inside `collect` by default; as
# its own stage it re-scrubs an existing workspace (see `slmconvert scrub`).
PIPELINE_STAGES = ("demo-data", "collect", "scrub", "cluster", "select", "finetune", "evaluate")


def _demo(config: PipelineConfig, ws: Workspace, force: bool, progress: Progress) -> tuple[str, str]:
    import json
    from pathlib import Path

    from slmconvert.demo import generate
    from slmconvert.io import write_json_atomic

    dc = config.demo_data
    if dc is None:
        return "not configured", ""
    out = Path(dc.output)
    stamp = out.with_name(out.name + ".params.json")
    params = dc.model_dump(mode="json")
    if not force and out.exists() and stamp.exists() and json.loads(stamp.read_text()) == params:
        return "skipped", f"{out} (unchanged)"
    stats = generate(out, sessions=dc.sessions, seed=dc.seed, fmt=dc.format)
    write_json_atomic(stamp, params)
    return "ran", f"{stats['records']} records, {stats['sessions']} sessions → {out}"


def _collect(config: PipelineConfig, ws: Workspace, force: bool, progress: Progress) -> tuple[str, str]:
    from slmconvert.collect.stage import run, summary

    m = run(config, ws, force=force, progress=progress)
    s = summary(m, ws)
    return m.status, f"{s['invocations']} invocations ({s['tool_calls']} tool calls), {s['sessions']} sessions, {s['quarantined']} quarantined"


def _scrub(config: PipelineConfig, ws: Workspace, force: bool, progress: Progress) -> tuple[str, str]:
    if config.scrub.enabled:
        m = ws.read_manifest("collect")
        return "inside collect", "scrubbed while collecting" if m and m.extra.get("scrub", {}).get("enabled") else ""
    return "off", "scrub.enabled is false: the workspace holds raw data"


def _cluster(config: PipelineConfig, ws: Workspace, force: bool, progress: Progress) -> tuple[str, str]:
    from slmconvert.cluster.stage import run

    m = run(config, ws, force=force, progress=progress)
    acc = m.extra.get("router_test_accuracy")
    return m.status, (f"{m.counts['sites']} call site(s), {m.counts['tasks']} tasks; {m.counts['train']} train / "
                      f"{m.counts['test']} test; router accuracy {'n/a' if acc is None else f'{acc:.3f}'}")


def _select(config: PipelineConfig, ws: Workspace, force: bool, progress: Progress) -> tuple[str, str]:
    from slmconvert.select.stage import run

    m = run(config, ws, force=force, progress=progress)
    cands = m.extra.get("candidates", {})
    return m.status, "; ".join(f"{site}: {', '.join(c) or 'none'}" for site, c in cands.items())


def _finetune(config: PipelineConfig, ws: Workspace, force: bool, progress: Progress) -> tuple[str, str]:
    from slmconvert.finetune.stage import run

    m = run(config, ws, force=force, progress=progress)
    return m.status, (f"{m.counts['adapters']} adapter(s): {m.counts['trained']} trained, {m.counts['skipped']} unchanged"
                      + (f", {m.counts['resumed']} resumed" if m.counts.get("resumed") else ""))


def _evaluate(config: PipelineConfig, ws: Workspace, force: bool, progress: Progress) -> tuple[str, str]:
    from slmconvert.evaluate.stage import run

    m = run(config, ws, force=force, progress=progress)
    h = m.extra["headline"]
    v = h["verdicts"]
    return m.status, (f"{v['replace']} replace, {v['hybrid']} hybrid, {v['keep-llm']} keep-llm; "
                      f"{100 * h['share_calls']:.0f}% of calls move to SLMs")


RUNNERS: dict[str, Callable[[PipelineConfig, Workspace, bool, Progress], tuple[str, str]]] = {
    "demo-data": _demo,
    "collect": _collect,
    "scrub": _scrub,
    "cluster": _cluster,
    "select": _select,
    "finetune": _finetune,
    "evaluate": _evaluate,
}


def run_pipeline(config: PipelineConfig, ws: Workspace, *, start: str | None = None, stop: str | None = None,
                 force: bool = False, progress: Progress = NULL_PROGRESS,
                 on_stage: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    names = list(PIPELINE_STAGES)
    for label, value in (("--from", start), ("--until", stop)):
        if value is not None and value not in names:
            raise StageError(f"{label} {value!r}: unknown stage (stages: {', '.join(names)})")
    i = names.index(start) if start else 0
    j = names.index(stop) + 1 if stop else len(names)
    results = []
    for name in names[i:j]:
        if on_stage:
            on_stage(name)
        t = time.perf_counter()
        status, summary = RUNNERS[name](config, ws, force, progress)
        results.append({"stage": name, "status": status, "seconds": round(time.perf_counter() - t, 2), "summary": summary})
    return results
