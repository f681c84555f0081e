"""Run the stages of a pipeline in order; each one skips itself when its inputs and config are unchanged.

Every run appends one record to WS/iterations.jsonl (paper step S6): which stages re-ran and
why it mattered (invocations, sessions, adapters before and after), and the evaluation headline
before and after, so the effect of new logs on what moves to SLMs is on file.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from slmconvert.config import PipelineConfig
from slmconvert.errors import StageError
from slmconvert.progress import NULL_PROGRESS, Progress
from slmconvert.workspace import Workspace

ITERATIONS = "iterations.jsonl"

# The stages, in pipeline order. `scrub` runs inside `collect` by default; as
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
    lo, hi = h["share_calls_interval"]
    agree = f", {100 * h['agreement']:.0f}% agreeing with the LLM" if h.get("agreement") is not None else ""
    return m.status, (f"{100 * h['share_calls']:.0f}% [{100 * lo:.0f}–{100 * hi:.0f}%] of calls move to SLMs{agree} "
                      f"(verified on {h['calls']} held-out calls); per task: {v['replace']} replace, {v['hybrid']} hybrid, "
                      f"{v['keep-llm']} keep-llm")


RUNNERS: dict[str, Callable[[PipelineConfig, Workspace, bool, Progress], tuple[str, str]]] = {
    "demo-data": _demo,
    "collect": _collect,
    "scrub": _scrub,
    "cluster": _cluster,
    "select": _select,
    "finetune": _finetune,
    "evaluate": _evaluate,
}


def snapshot(ws: Workspace) -> dict[str, Any]:
    """What a later iteration is compared against: sizes and the evaluation headline."""
    out: dict[str, Any] = {}
    cm = ws.read_manifest("collect")
    if cm:
        out["invocations"] = cm.counts.get("invocations")
        out["sessions"] = cm.counts.get("sessions")
    km = ws.read_manifest("cluster")
    if km:
        out["sites"], out["tasks"] = km.counts.get("sites"), km.counts.get("tasks")
        out["router_test_accuracy"] = km.extra.get("router_test_accuracy")
    fm = ws.read_manifest("finetune")
    if fm:
        out["adapters"] = {f"{a['site']}/{a['model']}": a.get("fingerprint", "")[:12] for a in fm.extra.get("adapters", [])}
    em = ws.read_manifest("evaluate")
    if em:
        h = em.extra.get("headline", {})
        out["headline"] = {k: h.get(k) for k in ("share_calls", "share_calls_interval", "agreement", "agreement_interval",
                                                 "share_tokens", "share_cost", "verdicts")}
        out["verdicts"] = em.extra.get("verdicts", {})
    return out


def record_iteration(ws: Workspace, results: list[dict[str, Any]], before: dict[str, Any], started: str) -> dict[str, Any]:
    """Append this run to WS/iterations.jsonl (one JSON line, flushed and fsynced)."""
    import json
    import os

    from slmconvert.workspace import utcnow

    after = snapshot(ws)
    path = ws.root / ITERATIONS
    n = 1
    if path.exists():
        with open(path, encoding="utf-8") as f:
            n = 1 + sum(1 for line in f if line.strip())
    retrained = sorted(k for k, v in after.get("adapters", {}).items() if before.get("adapters", {}).get(k) != v)
    changed_verdicts = {k: [before.get("verdicts", {}).get(k), v] for k, v in after.get("verdicts", {}).items()
                        if before.get("verdicts", {}).get(k) != v}
    record = {"iteration": n, "started_at": started, "finished_at": utcnow(),
              "ran": [r["stage"] for r in results if r["status"] in ("ran", "updated")],
              "skipped": [r["stage"] for r in results if r["status"] == "skipped"],
              "stages": results, "new_invocations": (after.get("invocations") or 0) - (before.get("invocations") or 0),
              "retrained_adapters": retrained, "verdict_changes": changed_verdicts,
              "before": {k: v for k, v in before.items() if k not in ("adapters", "verdicts")},
              "after": {k: v for k, v in after.items() if k not in ("adapters", "verdicts")}}
    ws.root.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return record


def run_pipeline(config: PipelineConfig, ws: Workspace, *, start: str | None = None, stop: str | None = None,
                 force: bool = False, progress: Progress = NULL_PROGRESS,
                 on_stage: Callable[[str], None] | None = None, source: str = "pipeline") -> list[dict[str, Any]]:
    from slmconvert.workspace import utcnow

    names = list(PIPELINE_STAGES)
    for label, value in (("--from", start), ("--until", stop)):
        if value is not None and value not in names:
            raise StageError(f"{label} {value!r}: unknown stage (stages: {', '.join(names)})")
    i = names.index(start) if start else 0
    j = names.index(stop) + 1 if stop else len(names)
    from slmconvert.validation import check_pipeline

    # Every missing log, policy, catalogue, prices file or model at once, before any stage runs.
    check_pipeline(config, source, set(names[i:j]))
    started, before = utcnow(), snapshot(ws) if ws.root.exists() else {}
    results: list[dict[str, Any]] = []
    for name in names[i:j]:
        if on_stage:
            on_stage(name)
        t = time.perf_counter()
        try:
            status, summary = RUNNERS[name](config, ws, force, progress)
        except BaseException as e:  # on file too: an interrupted or failed iteration, and where it stopped
            results.append({"stage": name, "status": "interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
                            "seconds": round(time.perf_counter() - t, 2), "summary": str(e)[:300]})
            if ws.root.exists():
                record_iteration(ws, results, before, started)
            raise
        results.append({"stage": name, "status": status, "seconds": round(time.perf_counter() - t, 2), "summary": summary})
    record_iteration(ws, results, before, started)
    return results
