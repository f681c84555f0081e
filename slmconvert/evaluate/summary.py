"""Step 4 of `evaluate`: summary.json (and results.parquet), from the scored rows and the verified policy.

The headline is what the routing policy moves, measured on verification sessions and re-weighted to
the traffic mix, with intervals. The per-task view (each task of the LLM's answers, scored on the
site's adapter, with a replace/hybrid/keep-llm verdict) stays beside it as a diagnosis: it says where
the SLM is good, not what `serve` will do.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from slmconvert.evaluate.scoring import ALL_METRICS, aggregate, copy_stats, invented_tools, per_argument
from slmconvert.io import write_parquet_atomic

EVAL_VERSION = 6  # 6: the action head (evaluate.tool_choice: head); 5: the evidence ceiling, the counting-loop guard (a re-run re-evaluates)
PAPER_ESTIMATE = "40-70% of calls (Belcak et al., 2025, §5)"


def choose_adapters(rows) -> dict[str, str]:
    """Per site, the adapter whose answers are acceptable most often (then the smaller model)."""
    site_models: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["variant"] == "finetuned":
            site_models[r["site"]][r["model"]].append(r)
    return {site: max(models, key=lambda m: (sum(r["acceptable"] for r in models[m]) / len(models[m]), -len(m)))
            for site, models in site_models.items()}


def policy_headline(check: dict[str, Any], per_task_view: dict[str, Any], tasks_doc: dict[str, Any]) -> dict[str, Any]:
    """The share of the log's calls, tokens and cost the policy moves (estimated on verification sessions,
    traffic-weighted), with intervals and the evidence behind it."""
    v = check["verification"]["all"]
    sp = check["split"]
    calls_total = per_task_view["calls_total"]
    tok_total = per_task_view["tokens_total"]
    cost_total = per_task_view["llm_cost_total_usd"]
    share_tokens = v["share_tokens"] if v["share_tokens"] is not None else v["share_calls"]
    share_cost = v["share_cost"] if v["share_cost"] is not None else None
    return {
        "share_calls": v["share_calls"], "share_calls_interval": v["share_calls_interval"],
        "share_tokens": share_tokens, "share_tokens_interval": v["share_tokens_interval"] or v["share_calls_interval"],
        "share_cost": share_cost, "share_cost_interval": v["share_cost_interval"],
        "agreement": v["agreement_weighted"], "agreement_interval": v["agreement_weighted_interval"],
        "answered": v["answered"], "agree": v["agree"], "calls": v["calls"],
        "coverage": v["coverage"], "coverage_interval": v["coverage_interval"],
        "calls_moved": round(v["share_calls"] * calls_total, 1), "calls_total": calls_total,
        "tokens_moved": int(share_tokens * tok_total) if share_tokens is not None else None, "tokens_total": tok_total,
        "llm_cost_moved_usd": round(share_cost * cost_total, 4) if share_cost is not None and cost_total is not None else None,
        "llm_cost_total_usd": cost_total,
        "measured_on": f"{v['calls']} sampled calls of {sp['verification_sessions']} verification sessions; policy fitted on "
                       f"{sp['calibration_calls']} calls of {sp['calibration_sessions']} other held-out sessions",
        "not_answered_because": v.get("not_answered_because", {}),
        "evidence_ceiling": {k: (check.get("evidence") or {}).get(k)
                             for k in ("share_calls", "share_calls_all_test", "agreeing_needed_per_kind", "advice")},
        "verdicts": per_task_view["verdicts"], "paper_estimate": PAPER_ESTIMATE,
    }


def summarise(config, tasks_doc, rows, adapters, chosen, problems, judge_stats, by_id, policy_doc, check) -> dict[str, Any]:
    """summary.json: the headline (what the routing policy moves, measured on verification sessions), the
    per-task view, speed, cost, and the policy's evidence."""
    from slmconvert.evaluate.prices import load_prices
    from slmconvert.evaluate.verdicts import decide, share_moved

    ec = config.evaluate
    prices = load_prices(ec.prices)
    groups: dict[tuple, list] = defaultdict(list)
    for r in rows:
        groups[(r["site"], r["model"], r["variant"], r["task"])].append(r)
    tasks_out = []
    for site, sd in tasks_doc["sites"].items():
        llm_model = ec.llm_model or (sd.get("models") or [None])[0]
        for t in sd["tasks"]:
            task = t["task"]
            m = chosen.get(site)
            tuned = groups.get((site, m, "finetuned", task), []) if m else []
            if m is None:
                from slmconvert.evaluate.verdicts import Verdict

                v = Verdict("keep-llm", "no evaluated adapter for this call site", None, 0)
            else:
                v = decide([r["acceptable"] for r in tuned], [r["confidence"] for r in tuned], replace_at=ec.replace_at,
                           hybrid_min_coverage=ec.hybrid_min_coverage, min_test_examples=ec.min_test_examples)
            cost = t.get("cost_usd")
            cost_source = "logged" if cost is not None else None
            if cost is None:
                cost = prices.cost(llm_model, t["prompt_tokens"], t["completion_tokens"])
                cost_source = f"priced as {prices.lookup(llm_model).name}" if cost is not None else None
            per_model = {}
            for (s2, mname, variant, t2), rs in groups.items():
                if s2 == site and t2 == task:
                    per_model[f"{mname}/{variant}"] = aggregate(rs)
            entry = {"site": site, "task": task, "label": t["label"], "kind": t["kind"], "size": t["size"],
                     "share_calls": t["share_calls"], "prompt_tokens": t["prompt_tokens"],
                     "completion_tokens": t["completion_tokens"], "test_examples": t.get("test", 0),
                     "evaluated": len(tuned), "model": m, "llm_model": llm_model,
                     "llm_cost_usd": round(cost, 6) if cost is not None else None, "cost_source": cost_source,
                     "base": per_model.get(f"{m}/base") if m else None,
                     "finetuned": per_model.get(f"{m}/finetuned") if m else None,
                     "all_models": per_model, **v.to_dict()}
            tasks_out.append(entry)
    per_task_view = share_moved(tasks_out)
    headline = policy_headline(check, per_task_view, tasks_doc)

    # speed and cost of the SLM side
    speed = {}
    for site, m in chosen.items():
        tuned = [r for r in rows if r["site"] == site and r["model"] == m and r["variant"] == "finetuned"]
        agg = aggregate(tuned)
        speed[site] = {"model": m, "seconds_per_call": agg["seconds_per_call"], "tokens_per_s": agg["tokens_per_s"]}
    lat = [by_id[r["invocation_id"]].latency_ms for r in rows if r["variant"] == "finetuned"
           and by_id.get(r["invocation_id"]) is not None and by_id[r["invocation_id"]].latency_ms is not None]
    llm_latency = round(sum(lat) / len(lat) / 1000.0, 3) if lat else None
    sec = [s["seconds_per_call"] for s in speed.values() if s["seconds_per_call"] is not None]
    slm_s = sum(sec) / len(sec) if sec else None
    slm_cost = ((headline["calls_moved"] or 0.0) * slm_s * ec.slm_hour_usd / 3600.0) if slm_s is not None else None
    cost = {"llm_cost_moved_usd": headline["llm_cost_moved_usd"], "llm_cost_total_usd": headline["llm_cost_total_usd"],
            "slm_cost_moved_usd": round(slm_cost, 4) if slm_cost is not None else None,
            "slm_hour_usd": ec.slm_hour_usd, "prices_as_of": prices.as_of,
            "net_saving_usd": round(headline["llm_cost_moved_usd"] - slm_cost, 4)
            if headline["llm_cost_moved_usd"] is not None and slm_cost is not None else None,
            "tokens_estimated": tasks_doc.get("totals", {}).get("tokens_estimated")}
    overall: dict[str, Any] = {}
    for variant in ("base", "finetuned"):
        for kind in ("tool", "text"):
            rs = [r for r in rows if r["variant"] == variant and r["kind"] == kind and chosen.get(r["site"]) == r["model"]]
            if rs:
                overall[f"{variant}_{kind}"] = aggregate(rs)
    per_arg: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["variant"] == "finetuned" and r["kind"] == "tool" and chosen.get(r["site"]) == r["model"]:
            per_argument(r, by_id, per_arg)
    return {
        "version": EVAL_VERSION, "headline": headline, "per_task_view": per_task_view, "cost": cost,
        "speed": {"slm": speed, "llm_seconds_per_call": llm_latency,
                  "note": "SLM seconds per call are batched wall time / batch size on this machine"},
        "overall": overall, "chosen_adapters": chosen,
        "per_argument": {k: {a: round(sum(v) / len(v), 4) for a, v in d.items()} for k, d in per_arg.items()},
        "copying": copy_stats(chosen_rows := [r for r in rows if r["variant"] == "finetuned" and chosen.get(r["site"]) == r["model"]], by_id),
        "invented_tools": invented_tools(chosen_rows, by_id),
        "action_head": policy_doc.get("action_head"),
        "tasks": tasks_out, "problems": problems, "judge": judge_stats,
        "policy": {**check, "rules": policy_doc["rules"], "requests": policy_doc["requests"], "gate_encoder": policy_doc.get("gate_encoder"),
                   "target_agreement": policy_doc["target_agreement"], "confidence_level": policy_doc["confidence_level"]},
        "thresholds": {"replace_at": ec.replace_at, "hybrid_min_coverage": ec.hybrid_min_coverage,
                       "min_test_examples": ec.min_test_examples, "text_similarity_at": ec.text_similarity_at,
                       "judge_pass_at": ec.judge.pass_at if ec.judge else None},
        "adapters": [{k: a.get(k) for k in ("site", "model", "path", "method", "artefact", "examples", "train_loss")}
                     for a in adapters],
    }


def write_results(path: Path, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa

    cols = ["invocation_id", "session", "site", "task", "kind", "model", "variant", "weight", "prompt_tokens", "new_tokens",
            "seconds", "confidence", "acceptable", *ALL_METRICS, "embedding_similarity", "judge", "predicted_call",
            "well_formed", "expected", "prediction"]
    table = pa.table({c: [r.get(c) for r in rows] for c in cols}) if rows else pa.table({c: pa.array([], pa.string()) for c in cols})
    write_parquet_atomic(path, table)
