"""Step 3 of `evaluate`: fit the routing policy `serve` applies, and verify it (slmconvert.policy).

The test sessions are split (seeded, by session) into calibration and verification. On calibration:
the request gate (how familiar a request must be to the site's training requests) and one rule per
kind of SLM answer (the confidence above which its agreement with the LLM has a lower bound at the
target). On verification, which nothing was tuned on: what the policy really does, with intervals,
re-weighted to the traffic mix. Plus what a reader needs to trust it: the confusion of the LLM's task
with the SLM's answer, and a risk-coverage curve per site.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

import numpy as np

from slmconvert.progress import NULL_PROGRESS, Progress


def familiarity_references(gate, train_by_site: dict[str, list], seed: int, cache=None,
                           progress: Progress = NULL_PROGRESS):
    """Per site, unit embeddings of (at most Familiarity.MAX_REFERENCES, seeded) training requests'
    prompting turns, embedded by `gate` (slmconvert.embeddings.GateEncoder: what serve will embed requests with)."""
    from slmconvert.embeddings import embed_texts
    from slmconvert.policy import Familiarity, request_text

    rng = random.Random(seed)
    refs = {}
    for site, invs in sorted(train_by_site.items()):
        texts = sorted({request_text(i.request.messages) for i in invs})
        if len(texts) > Familiarity.MAX_REFERENCES:
            texts = rng.sample(texts, Familiarity.MAX_REFERENCES)
        if texts:
            vecs, _ = embed_texts(texts, gate, cache, progress, f"embedding {site}'s training requests")
            refs[site] = np.asarray(vecs, dtype=np.float32)
    return Familiarity(refs, gate.id, gate.probe())


def policy_rows(rows, chosen, by_id, site_tasks, router, familiarity, prices, llm_models, cache=None,
                gate=None) -> list[dict[str, Any]]:
    """The chosen adapters' answers as the policy sees them: answer key, validity, confidence, the request's
    familiarity (embedded by `gate`, as the references were; default: the router's model) and routed site, and
    what the call weighs (traffic, LLM tokens, LLM cost)."""
    from slmconvert.embeddings import embed_texts
    from slmconvert.policy import answer_key, invalid_reason, request_text

    out = []
    for r in rows:
        if r["variant"] != "finetuned" or chosen.get(r["site"]) != r["model"]:
            continue
        inv = by_id.get(r["invocation_id"])
        messages = inv.request.messages if inv is not None else []
        tools = inv.request.tools if inv is not None else None
        usage = inv.usage if inv is not None else None
        tokens = ((usage.prompt_tokens or 0) + (usage.completion_tokens or 0)) if usage else None
        cost = inv.cost_usd if inv is not None else None
        if cost is None and usage is not None and prices is not None:
            cost = prices.cost(llm_models.get(r["site"]), usage.prompt_tokens or 0, usage.completion_tokens or 0)
        out.append({"invocation_id": r["invocation_id"], "site": r["site"], "task": r["task"], "session": r["session"],
                    "confidence": r["confidence"], "signals": r.get("signals") or {}, "agrees": r["acceptable"], "weight": r.get("weight", 1.0),
                    "tokens": tokens, "cost": cost, "messages": messages, "tools": tools,
                    "key": answer_key(r["response"], site_tasks.get(r["site"], []), messages),
                    "invalid": invalid_reason(r["response"], tools, r["well_formed"])})
    if out:
        texts = [request_text(p["messages"]) for p in out]
        vecs, _ = embed_texts(texts, gate or router.embedder, cache)
        by_site: dict[str, list[int]] = defaultdict(list)
        for i, p in enumerate(out):
            by_site[p["site"]].append(i)
        for site, idx in by_site.items():
            for i, s in zip(idx, familiarity.score(site, vecs[idx])):
                out[i]["similarity"] = s
        for p, (site, _) in zip(out, router.route_many([(p["messages"], p["tools"]) for p in out])):
            p["routed_to"] = site
    for p in out:
        del p["messages"], p["tools"]
    return out


def pick_signal(config, prows, calibration: set[str]) -> tuple[str, dict[str, dict[str, float | None]]]:
    """The confidence signal the policy thresholds: `evaluate.confidence_signal`, or with `auto` the one whose
    AUROC (agreeing vs not, valid answers of calibration sessions) is highest. Rows get its value as confidence."""
    from slmconvert.policy import AUTO, choose_signal, signal_auroc

    cal_rows = [r for r in prows if r["session"] in calibration and not r["invalid"] and r["key"] is not None]
    auroc = signal_auroc(cal_rows)
    wanted = config.evaluate.confidence_signal
    chosen = choose_signal(auroc) if wanted == AUTO else wanted
    for r in prows:
        if chosen in r["signals"]:
            r["confidence"] = r["signals"][chosen]
    return chosen, auroc


def fit_routing_policy(config, tasks_doc, prows, familiar_refs: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The policy document (policy.json) and its verification (summary.json's "policy")."""
    from slmconvert.policy import Policy, agreeing_needed, fit_policy, split_sessions, verify

    ec = config.evaluate
    site_tasks = {site: [t["task"] for t in sd["tasks"]] for site, sd in tasks_doc["sites"].items()}
    cal, ver = split_sessions((r["session"] for r in prows), ec.seed)
    signal, auroc = pick_signal(config, prows, cal)
    doc = fit_policy(prows, cal, target=ec.target_agreement, level=ec.confidence_level, seed=ec.seed, sites=site_tasks,
                     novelty_alpha=ec.novelty_alpha)
    doc["confidence_signal"] = signal
    doc["signal_auroc"] = auroc
    doc["constrained_decoding"] = ec.constrained_decoding
    doc["tool_choice"] = ec.tool_choice if ec.constrained_decoding else "greedy"
    policy = Policy(doc)
    ver_rows = [r for r in prows if r["session"] in ver]
    verification = verify(policy, prows, ver, ec.confidence_level)
    targets = sorted({*ec.compare_targets, ec.target_agreement})
    ceilings = {t: evidence_ceiling(prows, cal, ver, agreeing_needed(t, ec.confidence_level), ec.confidence_level)
                for t in targets}
    at_targets = [{**(target_row(doc, verification["all"], ec.confidence_level) if t == ec.target_agreement else
                      at_target(prows, cal, ver, target=t, level=ec.confidence_level, seed=ec.seed, sites=site_tasks,
                                novelty_alpha=ec.novelty_alpha)), "applied": t == ec.target_agreement,
                   "ceiling_share_calls": ceilings[t]["share_calls"],
                   "ceiling_share_calls_all_test": ceilings[t]["share_calls_all_test"]}
                  for t in targets]
    check = {"split": {"calibration_sessions": len(cal), "verification_sessions": len(ver),
                       "calibration_calls": sum(r["session"] in cal for r in prows), "verification_calls": len(ver_rows)},
             "verification": verification,
             "routed_elsewhere": sum(r.get("routed_to") not in (None, r["site"]) for r in ver_rows),
             "familiarity_references": familiar_refs,
             "confidence_signal": {"chosen": signal, "auroc_on_calibration": auroc},
             "at_targets": at_targets,
             "evidence": {"target": ec.target_agreement, **ceilings[ec.target_agreement]},
             "confusion": confusion(prows),
             "risk_coverage": {site: risk_coverage([r for r in ver_rows if r["site"] == site])
                               for site in sorted({r["site"] for r in ver_rows})}}
    return doc, check


def at_target(prows, cal: set[str], ver: set[str], *, target: float, level: float, seed: int, sites, novelty_alpha: float
              ) -> dict[str, Any]:
    """The policy fitted at `target` on the calibration sessions, verified on the verification sessions: the share of
    traffic it moves and the agreement of what it moves, with intervals, and the kinds of answer it lets the SLM give."""
    from slmconvert.policy import Policy, fit_policy, verify

    doc = fit_policy(prows, cal, target=target, level=level, seed=seed, sites=sites, novelty_alpha=novelty_alpha)
    return target_row(doc, verify(Policy(doc), prows, ver, level)["all"], level)


def target_row(doc: dict[str, Any], v: dict[str, Any], level: float) -> dict[str, Any]:
    """A fitted policy (`doc`) and its verification over all sites (`v`) as a row of the targets' table."""
    from slmconvert.policy import agreeing_needed

    target = doc["target_agreement"]
    return {"target": target, "share_calls": v["share_calls"], "share_calls_interval": v["share_calls_interval"],
            "agreement": v["agreement_weighted"], "agreement_interval": v["agreement_weighted_interval"],
            "answered": v["answered"], "agree": v["agree"], "calls": v["calls"],
            "kinds_to_slm": sum(r["action"] == "slm" for rules in doc["rules"].values() for r in rules.values()),
            "agreeing_needed_per_kind": agreeing_needed(target, level)}


def evidence_ceiling(prows, cal: set[str], ver: set[str], need: int, level: float, top: int = 5) -> dict[str, Any]:
    """What the test sample could show moving at all. A kind of answer goes to the SLM only when at least `need` of its
    calibration answers agree, so even an SLM that agreed with the LLM on every call would leave the kinds with fewer
    calibration calls than that to the LLM; such an SLM's answer has the kind of the LLM's task (a tool task), or is
    a text reply (all text tasks: one kind, as the policy keys them). `share_calls`: the traffic-weighted share of the
    verification calls such an SLM could move with the calls evaluated; `share_calls_all_test`: had every test call
    been evaluated (a sampled call stands for `weight` test calls of its task). The request gate is left out: both are
    upper bounds. `kinds`: the largest kinds, their calibration calls sampled and in the whole test split; `advice`:
    what would let more of the traffic qualify, when something is short."""
    from slmconvert.policy import TEXT_KEY, weighted_share

    def kind(r) -> tuple[str, str]:
        return r["site"], (r["task"] if str(r["task"]).startswith("tool:") else TEXT_KEY)

    sampled: dict[tuple[str, str], int] = defaultdict(int)
    in_split: dict[tuple[str, str], float] = defaultdict(float)
    for r in prows:
        if r["session"] in cal:
            sampled[kind(r)] += 1
            in_split[kind(r)] += float(r.get("weight") or 1.0)
    ver_rows = [r for r in prows if r["session"] in ver]
    w = [float(r.get("weight") or 1.0) for r in ver_rows]
    now, _ = weighted_share([sampled[kind(r)] >= need for r in ver_rows], w, level)
    full, _ = weighted_share([in_split[kind(r)] >= need - 1e-9 for r in ver_rows], w, level)
    kinds = [{"site": s, "key": t, "calibration_sampled": sampled[(s, t)], "calibration_in_test_split": round(in_split[(s, t)]),
              "qualifies": sampled[(s, t)] >= need}
             for s, t in sorted(in_split, key=lambda k: (-in_split[k], k))[:top]]
    out = {"agreeing_needed_per_kind": need, "share_calls": now or 0.0, "share_calls_all_test": full or 0.0,
           "kinds": kinds, "advice": None}
    if kinds and (now or 0.0) < (full or 0.0):
        out["advice"] = "evaluate more of the test calls (evaluate.max_test_examples; null: all of them)"
    elif kinds and not kinds[0]["qualifies"] and kinds[0]["calibration_in_test_split"] < need:
        big = kinds[0]
        out["advice"] = (f"the test split is too small for this target: its largest kind, {big['key']} at {big['site']}, has "
                         f"about {big['calibration_in_test_split']} calibration calls in all and a kind needs {need} agreeing ones; "
                         "hold out more sessions (cluster.test_fraction), collect more logs, or lower evaluate.target_agreement")
    return out


def confusion(prows) -> dict[str, dict[str, int]]:
    """LLM's task x the SLM's answer key, over all evaluated test calls of the chosen adapters."""
    out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in prows:
        out[f"{r['site']}/{r['task']}"][r["key"] or "(no known task)"] += 1
    return {k: dict(v) for k, v in sorted(out.items())}


def risk_coverage(rows, points: int = 40) -> list[list[float]]:
    """[coverage, agreement] when the SLM answers every valid answer at or above a confidence, for
    thresholds from the most confident answer down (answer keys pooled): the curve the rules pick from."""
    n = len(rows)
    valid = sorted(((r["confidence"] if r["confidence"] is not None else float("-inf"), bool(r["agrees"]))
                    for r in rows if not r["invalid"] and r["key"] is not None), key=lambda x: -x[0])
    if not n or not valid:
        return []
    curve, good = [], 0
    step = max(1, len(valid) // points)
    for k, (_, a) in enumerate(valid, start=1):
        good += a
        if k % step == 0 or k == len(valid):
            curve.append([round(k / n, 4), round(good / k, 4)])
    return curve
