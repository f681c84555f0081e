from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from slmconvert.cli import app
from slmconvert.cli._common import ConfigOpt, ForceOpt, JsonOpt, RichProgress, SetOpt, WorkspaceOpt, console, handle_errors, load, print_json


@app.command()
@handle_errors
def evaluate(
    workspace: Optional[Path] = WorkspaceOpt,
    max_examples: Optional[int] = typer.Option(None, "--max-examples", help="Test calls per call site at most (evaluate.max_test_examples)."),
    no_base: bool = typer.Option(False, "--no-base", help="Skip the untrained base model (faster; no base-vs-fine-tuned comparison)."),
    judge_url: Optional[str] = typer.Option(None, "--judge-url", help="OpenAI-compatible endpoint for LLM-as-judge on text replies (key from $SLMCONVERT_JUDGE_API_KEY)."),
    judge_model: Optional[str] = typer.Option(None, "--judge-model", help="Judge model name (with --judge-url)."),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    force: bool = ForceOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Compare the fine-tuned SLMs with the LLM's logged responses on the test split; fit the routing policy serve applies.

    Writes WS/eval/policy.json (fitted on calibration sessions), summary.json, results.parquet and report.html.
    The headline is what that policy moves (share of calls, tokens, cost) and how often it agrees with the
    LLM, measured on verification sessions nothing was tuned on, with intervals.
    """
    import json

    extra = []
    if max_examples is not None:
        extra.append(f"evaluate.max_test_examples={max_examples}")
    if no_base:
        extra.append("evaluate.base=false")
    if judge_url or judge_model:
        if not (judge_url and judge_model):
            from slmconvert.errors import ConfigError

            raise ConfigError("--judge-url/--judge-model", ["give both the endpoint URL and the judge model name"])
        extra += [f"evaluate.judge.url={json.dumps(judge_url)}", f"evaluate.judge.model={json.dumps(judge_model)}"]
    cfg, ws = load(config, set_, workspace, extra)

    from slmconvert.evaluate.stage import SUMMARY, run
    from slmconvert.io import read_json

    m = run(cfg, ws, force=force, progress=RichProgress(not as_json))
    summary = read_json(ws.stage_dir("evaluate") / SUMMARY)
    if as_json:
        print_json({"status": m.status, "counts": m.counts, "headline": summary["headline"], "cost": summary["cost"],
                    "tasks": [{k: t[k] for k in ("site", "task", "label", "verdict", "reason", "quality", "coverage", "threshold")}
                              for t in summary["tasks"]],
                    "at_targets": summary["policy"].get("at_targets", []),
                    "problems": summary["problems"], "report": str(ws.stage_dir("evaluate") / "report.html")})
        return
    print_verdicts(summary, f"evaluate: {m.status}")
    console.print(f"report: {ws.stage_dir('evaluate') / 'report.html'}", highlight=False)


def _iv(iv) -> str:
    from slmconvert.evaluate.report import pct

    return f"[{pct(iv[0])}–{pct(iv[1])}]" if iv else ""


def headline_text(summary: dict) -> str:
    """The decision in one sentence: what serve moves, how often it agrees, on which evidence."""
    from slmconvert.evaluate.report import pct

    h, pol = summary["headline"], summary["policy"]
    agree = (f"agreeing with the LLM on {pct(h['agreement'])} {_iv(h['agreement_interval'])} of them ({h['agree']}/{h['answered']} "
             "sampled answers)" if h["answered"] else "so there is no agreement to measure")
    cost = f", {pct(h['share_cost'])} {_iv(h['share_cost_interval'])} of LLM cost" if h.get("share_cost") is not None else ""
    return (f"[bold]Moves to SLMs[/] (the routing policy serve applies): {pct(h['share_calls'])} {_iv(h['share_calls_interval'])} "
            f"of calls, {pct(h['share_tokens'])} of tokens{cost}, {agree}. Target {pct(pol['target_agreement'])} at a "
            f"{pct(pol['confidence_level'])} lower bound. [dim]Measured on {h['measured_on']}; traffic-weighted; paper: "
            f"{h['paper_estimate']}[/]" + ceiling_text(h.get("evidence_ceiling")))


def ceiling_text(c: dict | None) -> str:
    """What the test sample could show at all, when that is less than the whole traffic (an SLM agreeing on every call)."""
    from slmconvert.evaluate.report import pct

    if not c or c.get("share_calls") is None or c["share_calls"] >= 0.999:
        return ""
    return (f"\n[bold]Evidence ceiling[/]: with the calls evaluated, even an SLM that agreed on every call could move at most "
            f"{pct(c['share_calls'])} of the traffic at this target ({pct(c['share_calls_all_test'])} with every test call "
            f"evaluated): a kind of answer needs >= {c['agreeing_needed_per_kind']} agreeing calibration answers."
            + (f" To show more: {c['advice']}." if c.get("advice") else ""))


def targets_text(summary: dict) -> str:
    """The trade-off the target sets, each target's policy fitted on calibration and verified on the same calls."""
    from slmconvert.evaluate.report import pct

    rows = [r for r in (summary.get("policy") or {}).get("at_targets", []) if not r["applied"]]
    if not rows:
        return ""
    parts = [f"{pct(r['target'])}: {pct(r['share_calls'])} {_iv(r['share_calls_interval'])}"
             + (f", agreeing {pct(r['agreement'])} {_iv(r['agreement_interval'])}" if r["answered"] else "")
             + f" [dim](a kind needs >= {r['agreeing_needed_per_kind']} agreeing calibration answers"
             + (f"; at most {pct(r['ceiling_share_calls'])} could show" if r.get("ceiling_share_calls") is not None else "")
             + ")[/]" for r in rows]
    return ("[bold]At other targets[/] (each policy fitted on the calibration sessions and verified on the same calls; "
            "serve applies only the one above): " + "; ".join(parts))


def head_text(head: dict | None) -> str:
    """How well each site's action head names the LLM's tool on test calls it was not fitted on."""
    from slmconvert.evaluate.report import pct

    parts = []
    for site, m in sorted(((head or {}).get("sites") or {}).items()):
        if not m.get("fitted"):
            parts.append(f"{site}: none ({m['train_calls']} training tool calls of {m['tools']} tools; {m['why']}: greedy names)")
        elif m.get("test_calls"):
            parts.append(f"{site}: names the LLM's tool on {pct(m['accuracy'])} of {m['test_calls']} test tool calls of "
                         f"{m['test_sessions']} held-out sessions (always the most frequent tool: {pct(m['most_frequent_accuracy'])}); "
                         f"fitted on {m['train_calls']} calls of {m['train_sessions']} train sessions")
    return ("[dim]Action head (which tool a call names; evaluate.tool_choice): " + "; ".join(parts) + "[/]") if parts else ""


def print_verdicts(summary: dict, title: str) -> None:
    from rich.table import Table

    from slmconvert.evaluate.report import pct

    t = Table("site", "task", "calls", "test", "base", "fine-tuned", "verdict", title=title)
    colour = {"replace": "green", "hybrid": "yellow", "keep-llm": "red"}
    for task in summary["tasks"]:
        b, f = task.get("base") or {}, task.get("finetuned") or {}
        t.add_row(task["site"], f"{task['task']} [dim]{task['label'][:40]}[/]", str(task["size"]), str(task["evaluated"]),
                  pct(b.get("acceptable")), pct(f.get("acceptable")), f"[{colour[task['verdict']]}]{task['verdict']}[/]")
    console.print(t)
    view = summary.get("per_task_view") or {}
    if view:
        console.print(f"[bold]Per-task verdicts[/] (by the LLM's task; [dim]a diagnosis, not what serve gates on[/]): "
                      f"{pct(view['share_calls'])} of calls", highlight=False)
    console.print(headline_text(summary), highlight=False)
    other = targets_text(summary)
    if other:
        console.print(other, highlight=False)
    sig = (summary.get("policy") or {}).get("confidence_signal") or {}
    if sig.get("auroc_on_calibration"):
        aur = {k: v.get("all") for k, v in sig["auroc_on_calibration"].items() if v.get("all") is not None}
        shown = ", ".join(f"{k} {v:.2f}" for k, v in sorted(aur.items(), key=lambda kv: -kv[1])) or "not measurable (all answers agree, or none)"
        console.print(f"[dim]Confidence signal thresholded: {sig['chosen']}; AUROC on calibration (agreeing vs not): {shown}[/]",
                      highlight=False)
    head = head_text(summary.get("action_head"))
    if head:
        console.print(head, highlight=False)
    for p in summary.get("problems", []):
        console.print(f"[yellow]warning:[/] {p}", highlight=False)
