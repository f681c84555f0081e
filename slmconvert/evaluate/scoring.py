"""Step 2 of `evaluate`: every answer compared with the LLM's logged response.

A test answer is *acceptable* (agrees with the LLM) when it could stand in for the LLM's: for a tool
call, the right function with BFCL-equivalent arguments; for a text reply, a reply (not a tool call)
judged close enough (LLM-as-judge score, else embedding similarity of the two replies, at their
thresholds). The metric registry (slmconvert.metrics) gives the finer scores beside it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from slmconvert.config import PipelineConfig
from slmconvert.progress import Progress
from slmconvert.workspace import Workspace

STAGE = "evaluate"
ALL_METRICS = ["call_agreement", "function_name", "arguments", "argument_values", "exact_match", "valid_json",
               "chrf", "rouge_l"]


def score_rows(answers, task_kind: dict[tuple[str, str], str], signal: str = "mean_logprob") -> list[dict[str, Any]]:
    """One row per answer of `answers` (slmconvert.evaluate.generate.Answers): the metrics, the SLM's parsed
    answer, its confidence, and the weight (test calls it stands for)."""
    from slmconvert.chat import answer_text, parse_completion
    from slmconvert.metrics import Prediction, score
    from slmconvert.policy import all_signals, confidence_of

    rows = []
    site = answers.site
    for s, g, pt, key in zip(answers.sample, answers.generations, answers.prompt_tokens, answers.keys):
        inv = s.inv
        resp, ok = parse_completion(g["text"], answers.specials)
        m = score(inv.response, Prediction(resp, ok, g["text"]), inv.request.tools, ALL_METRICS)
        rows.append({"invocation_id": inv.id, "session": inv.session_id, "site": site, "task": s.task,
                     "kind": task_kind.get((site, s.task), "tool" if inv.response.tool_calls else "text"),
                     "model": answers.model, "variant": answers.variant, "weight": s.weight, "prompt_tokens": pt,
                     "new_tokens": g["new_tokens"], "seconds": g["seconds"], "confidence": confidence_of(g, signal), "signals": all_signals(g),
                     "expected": answer_text(inv.response), "prediction": g["text"],
                     "response": resp, "predicted_call": bool(resp.tool_calls), "well_formed": ok, **m,
                     "embedding_similarity": None, "judge": None, "acceptable": False,
                     "prompt_turn": _turn(inv), "_key": key})
    return rows


def _turn(inv) -> str:
    from slmconvert.cluster.features import prompting_turn

    return prompting_turn(inv.request.messages, 600)


def add_text_similarity(rows: list[dict[str, Any]], config: PipelineConfig, workspace: Workspace, progress: Progress) -> None:
    """Embedding cosine between the LLM's text reply and the SLM's (0 when the SLM called a tool instead)."""
    import numpy as np

    from slmconvert.embeddings import Embedder, EmbeddingCache, embed_texts

    text_rows = [r for r in rows if r["kind"] == "text" and not r["predicted_call"]]
    for r in rows:
        if r["kind"] == "text" and r["predicted_call"]:
            r["embedding_similarity"] = 0.0
    if not text_rows:
        return
    cc = config.cluster
    embedder = Embedder(cc.embedding_model, cc.batch_size, cc.device, 256)
    cache = EmbeddingCache(workspace.stage_dir(STAGE) / "cache", embedder.key)
    texts = [t for r in text_rows for t in (r["expected"], _reply_text(r["prediction"]))]
    vecs, _ = embed_texts(texts, embedder, cache, progress, "embedding replies")
    for k, r in enumerate(text_rows):
        r["embedding_similarity"] = round(float(np.clip(vecs[2 * k] @ vecs[2 * k + 1], -1.0, 1.0)), 4)


def _reply_text(prediction: str) -> str:
    return prediction.strip() or " "


def add_judge(rows: list[dict[str, Any]], jc, progress: Progress) -> dict[str, int]:
    from slmconvert.evaluate.judge import Judge

    judge = Judge(jc.url, jc.model, jc.api_key_env, jc.timeout_s)
    counts: dict[tuple, int] = defaultdict(int)
    todo = []
    for r in rows:
        if r["kind"] != "text" or r["predicted_call"]:
            continue
        key = (r["site"], r["model"], r["variant"])
        if counts[key] < jc.max_examples:
            counts[key] += 1
            todo.append(r)
    stats = {"judged": 0, "failed": 0}
    errors: list[str] = []
    if todo:
        progress.start("LLM-as-judge", total=len(todo))
    try:
        for r in todo:
            res = judge.grade(r["prompt_turn"], r["expected"], r["prediction"])
            r["judge"] = res.score
            if res.score is None:
                stats["failed"] += 1
                errors.append(res.error or "")
            else:
                stats["judged"] += 1
            progress.advance(1)
    finally:
        progress.stop()
    if errors:
        stats["first_error"] = errors[0]  # type: ignore[assignment]
    return stats


def mark_acceptable(rows: list[dict[str, Any]], ec) -> None:
    for r in rows:
        if r["kind"] == "tool":
            r["acceptable"] = bool(r["arguments"] == 1.0)
        elif r["predicted_call"]:
            r["acceptable"] = False
        elif r["judge"] is not None:
            r["acceptable"] = r["judge"] >= ec.judge.pass_at
        else:
            r["acceptable"] = (r["embedding_similarity"] or 0.0) >= ec.text_similarity_at


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def mean(vals):
        vals = [v for v in vals if v is not None]
        return round(sum(vals) / len(vals), 4) if vals else None

    out = {m: mean(r[m] for r in rows) for m in ALL_METRICS + ["embedding_similarity", "judge"]}
    out.update({"n": len(rows), "acceptable": mean(float(r["acceptable"]) for r in rows),
                "confidence": mean(r["confidence"] for r in rows),
                "seconds_per_call": mean(r["seconds"] for r in rows),
                "tokens_per_s": round(sum(r["new_tokens"] for r in rows) / max(sum(r["seconds"] for r in rows), 1e-9), 1) if rows else None})
    return out


def per_argument(r: dict[str, Any], by_id, acc) -> None:
    from slmconvert.metrics import argument_outcomes

    inv = by_id.get(r["invocation_id"])
    if inv is None:
        return
    outcomes, _ = argument_outcomes(inv.response, r["response"], inv.request.tools)
    for tool, arg, ok in outcomes:
        acc[tool][arg].append(float(ok))


def copy_stats(rows: list[dict[str, Any]], by_id) -> dict[str, Any]:
    """How much of the LLM's tool arguments is copied from the prompt (ids, dates, amounts that appear verbatim
    in the messages), and how often the SLM gets copied and other values right: the copying a small model
    must do to replace the LLM. Over the tool calls the SLM answered with the right tool."""
    import json as _json

    copied = other = copied_ok = other_ok = 0
    for r in rows:
        inv = by_id.get(r["invocation_id"])
        if inv is None or not inv.response.tool_calls or not r["response"].tool_calls:
            continue
        prompt = "\n".join(_json.dumps(m.get("content"), ensure_ascii=False) if not isinstance(m.get("content"), str)
                           else m["content"] for m in inv.request.messages)
        pred = {c.name: c.arguments for c in r["response"].tool_calls}
        for call in inv.response.tool_calls:
            if call.name not in pred:
                continue
            for k, v in (call.arguments or {}).items():
                if not isinstance(v, (str, int, float)) or isinstance(v, bool) or len(str(v)) < 3:
                    continue
                ok = str(pred[call.name].get(k)) == str(v)
                if str(v) in prompt:
                    copied += 1
                    copied_ok += ok
                else:
                    other += 1
                    other_ok += ok
    n = copied + other
    return {"argument_values": n, "in_prompt": copied, "share_in_prompt": round(copied / n, 4) if n else None,
            "slm_right_when_in_prompt": round(copied_ok / copied, 4) if copied else None,
            "slm_right_otherwise": round(other_ok / other, 4) if other else None}


def invented_tools(rows: list[dict[str, Any]], by_id) -> dict[str, int]:
    """Tool names the SLM called that the request did not offer, with how often (should be none)."""
    from collections import Counter

    seen: Counter = Counter()
    for r in rows:
        inv = by_id.get(r["invocation_id"])
        offered = {(t.get("function", t) or {}).get("name") for t in (inv.request.tools or [])} if inv is not None else set()
        if not offered:
            continue
        for c in r["response"].tool_calls:
            if c.name not in offered:
                seen[c.name] += 1
    return dict(seen.most_common())
