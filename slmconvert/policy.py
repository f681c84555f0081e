"""The routing policy: whether `serve` returns the SLM's answer or calls the LLM. One module, shared:
`evaluate` fits and verifies it, `serve` loads it from `WS/eval/policy.json` and applies it.

What the policy sees is what `serve` sees: the call site, the SLM's own answer (its task: the tool it
called, or "text"), the answer's confidence (mean token log-probability), and whether the answer is
valid (a tool the request offers, arguments valid against that tool's JSON schema).

A rule per (site, answer key) says "slm at confidence >= t" or "llm". It is fitted on *calibration*
sessions: of the calls where the SLM gave that kind of answer, the lowest threshold is kept whose
one-sided Clopper-Pearson lower bound (at `confidence_level`) of the share agreeing with the LLM
reaches `target`. It is then measured on *verification* sessions, which nothing was tuned on: the
realised agreement and coverage with their intervals. Too little evidence means the LLM.
This is selective prediction (risk-coverage, Geifman & El-Yaniv 2017) with a binomial bound.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

POLICY_VERSION = 1
TEXT_KEY = "text"


# --------------------------------------------------------------------------- intervals


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact two-sided binomial interval; its lower end at (1 - level) * 2 is the one-sided bound."""
    from scipy.stats import beta

    if n == 0:
        return 0.0, 1.0
    alpha = 1 - level
    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def lower_bound(k: int, n: int, level: float = 0.95) -> float:
    """One-sided lower confidence bound of a binomial proportion (Clopper-Pearson)."""
    from scipy.stats import beta

    return 0.0 if n == 0 or k == 0 else float(beta.ppf(1 - level, k, n - k + 1))


# --------------------------------------------------------------------------- what serve can see


def answer_key(response, site_tasks: Sequence[str], messages: list[dict] | None = None) -> str | None:
    """The task of the SLM's own answer: the known task of the tool it called, or "text"; None for a
    call of a tool (or shape) the site never had."""
    from slmconvert.cluster import features as F
    from slmconvert.cluster.stage import known_tool_task
    from slmconvert.invocation import Invocation, Request, Source

    if not response.tool_calls:
        return TEXT_KEY
    inv = Invocation(id="answer", source=Source("policy", "-", "-"), session_id="-", step=0,
                     request=Request(messages=messages or []), response=response)
    key = F.tool_action_key(inv)
    return known_tool_task(*key, list(site_tasks)) if key is not None else None


def invalid_reason(response, tools: list[dict] | None, well_formed: bool = True) -> str | None:
    """Why the SLM's answer cannot be returned as it is: broken JSON, a tool the request does not offer,
    arguments the tool's JSON schema rejects. None when it is valid."""
    import jsonschema

    if not well_formed:
        return "the SLM's tool call is not valid JSON"
    if not response.tool_calls or not tools:
        return None
    schemas = {}
    for t in tools:
        fn = t.get("function", t) if isinstance(t, dict) else {}
        if isinstance(fn.get("name"), str):
            schemas[fn["name"]] = fn.get("parameters") or {"type": "object"}
    for call in response.tool_calls:
        if call.name not in schemas:
            return f"the SLM called {call.name!r}, a tool the request does not offer"
        try:
            jsonschema.validate(call.arguments, schemas[call.name])
        except jsonschema.ValidationError as e:
            where = "/".join(str(p) for p in e.absolute_path) or "arguments"
            return f"the arguments of {call.name} do not match its schema ({where}: {e.message[:120]})"
        except jsonschema.SchemaError:
            continue  # a broken schema in the log is not the SLM's fault
    return None


# --------------------------------------------------------------------------- the policy


@dataclass
class Decision:
    use_slm: bool
    reason: str
    key: str | None = None


class Policy:
    def __init__(self, doc: dict[str, Any]):
        self.doc = doc
        self.rules: dict[str, dict[str, dict[str, Any]]] = doc.get("rules", {})

    def decide(self, site: str, key: str | None, confidence: float | None, invalid: str | None) -> Decision:
        if invalid is not None:
            return Decision(False, invalid, key)
        if key is None:
            return Decision(False, "the SLM's answer matches no task of the site", key)
        rule = self.rules.get(site, {}).get(key)
        if rule is None:
            return Decision(False, f"no rule for {key} answers at site {site}", key)
        if rule["action"] != "slm":
            return Decision(False, f"{key}: {rule['reason']}", key)
        t = rule["min_confidence"]
        if t is not None and (confidence is None or confidence < t):
            shown = "n/a" if confidence is None else f"{confidence:.3f}"
            return Decision(False, f"{key}: confidence {shown} below {t:.3f}", key)
        return Decision(True, f"{key}: confidence >= {t:.3f}" if t is not None else f"{key}: rule slm", key)

    def servable(self, site: str) -> bool:
        return any(r["action"] == "slm" for r in self.rules.get(site, {}).values())


def split_sessions(sessions: Iterable[str], seed: int) -> tuple[set[str], set[str]]:
    """Calibration and verification halves of the test sessions: by a seeded hash of the session id,
    so a session's calls stay together and the split is the same on every run."""
    cal, ver = set(), set()
    for s in sorted(set(sessions)):
        h = hashlib.sha256(f"{seed}:{s}".encode()).digest()[0]
        (cal if h % 2 == 0 else ver).add(s)
    return cal, ver


def fit_rule(points: Sequence[tuple[float | None, bool]], target: float, level: float) -> dict[str, Any]:
    """points: (confidence, agrees) of the valid calibration answers of one key. The lowest threshold
    (most coverage) whose lower bound of agreement reaches `target`, or action llm with the reason."""
    scored = sorted(((c if c is not None else float("-inf"), a) for c, a in points), key=lambda x: -x[0])
    n = len(scored)
    agree = sum(a for _, a in scored)
    best = None
    good = 0
    for k, (c, a) in enumerate(scored, start=1):
        good += a
        if k < n and scored[k][0] == c:
            continue  # a threshold must separate: the next answer is strictly less confident
        lb = lower_bound(good, k, level)
        if lb >= target:
            best = (k, c, good, lb)
    evidence = {"answered": n, "agree": agree, "agreement": round(agree / n, 4) if n else None}
    if best is None:
        need = _needed(target, level)
        why = (f"too little evidence: {n} calibration answer(s), at least {need} agreeing ones are needed for a "
               f"{level:.0%} lower bound of {target:.0%}" if agree < need else
               f"no confidence threshold gives a {level:.0%} lower bound of agreement >= {target:.0%} "
               f"({agree}/{n} agree overall)")
        return {"action": "llm", "min_confidence": None, "reason": why, "calibration": evidence}
    k, c, good, lb = best
    return {"action": "slm", "min_confidence": round(c, 6) if c != float("-inf") else None,
            "reason": f"{good}/{k} calibration answers at confidence >= threshold agree; lower bound {lb:.3f} >= {target:.2f}",
            "calibration": {**evidence, "kept": k, "kept_agree": good, "lower_bound": round(lb, 4)}}


def _needed(target: float, level: float) -> int:
    """Fewest answers, all agreeing, whose lower bound reaches the target: (1-level)^(1/n) >= target."""
    import math

    return max(1, math.ceil(math.log(1 - level) / math.log(target))) if 0 < target < 1 else 1


def fit_policy(rows: Sequence[dict[str, Any]], calibration: set[str], *, target: float, level: float,
               seed: int, sites: Iterable[str]) -> dict[str, Any]:
    """rows: the chosen adapters' answers on test calls, each with site, session, key, confidence, invalid, agrees."""
    from collections import defaultdict

    groups: dict[tuple[str, str], list[tuple[float | None, bool]]] = defaultdict(list)
    invalid = defaultdict(int)
    for r in rows:
        if r["session"] not in calibration or r["key"] is None:
            continue
        if r["invalid"]:
            invalid[(r["site"], r["key"])] += 1
            continue
        groups[(r["site"], r["key"])].append((r["confidence"], bool(r["agrees"])))
    rules: dict[str, dict[str, Any]] = {s: {} for s in sites}
    for (site, key), pts in sorted(groups.items()):
        rule = fit_rule(pts, target, level)
        rule["calibration"]["invalid"] = invalid.get((site, key), 0)
        rules.setdefault(site, {})[key] = rule
    return {"version": POLICY_VERSION, "target_agreement": target, "confidence_level": level, "bound": "clopper-pearson",
            "split": {"seed": seed, "method": "sha256(seed:session) parity; even = calibration"}, "rules": rules}


def verify(policy: Policy, rows: Sequence[dict[str, Any]], verification: set[str], level: float,
           weight: dict[tuple[str, str], float] | None = None) -> dict[str, Any]:
    """Realised agreement and coverage of the policy on verification sessions, overall and per site;
    with `weight` (per (site, LLM task): production calls each evaluated call stands for) also the
    traffic-weighted share of calls moved."""
    from collections import defaultdict

    out: dict[str, Any] = {}
    per_site: dict[str, list[tuple[bool, bool, float]]] = defaultdict(list)
    for r in rows:
        if r["session"] not in verification:
            continue
        d = policy.decide(r["site"], r["key"], r["confidence"], r["invalid"])
        w = (weight or {}).get((r["site"], r["task"]), 1.0)
        per_site[r["site"]].append((d.use_slm, bool(r["agrees"]), w))
    for site, pts in [("all", [p for v in per_site.values() for p in v]), *sorted(per_site.items())]:
        n = len(pts)
        answered = [a for used, a, _ in pts if used]
        k = len(answered)
        agree = sum(answered)
        lo, hi = clopper_pearson(agree, k, level)
        clo, chi = clopper_pearson(k, n, level)
        w_all = sum(w for _, _, w in pts)
        w_used = sum(w for used, _, w in pts if used)
        out[site] = {"calls": n, "answered": k, "agree": agree,
                     "agreement": round(agree / k, 4) if k else None, "agreement_interval": [round(lo, 4), round(hi, 4)],
                     "coverage": round(k / n, 4) if n else 0.0, "coverage_interval": [round(clo, 4), round(chi, 4)],
                     "share_calls_weighted": round(w_used / w_all, 4) if w_all else 0.0}
    return out


def load_policy(path) -> Policy | None:
    from pathlib import Path

    from slmconvert.io import read_json

    p = Path(path)
    return Policy(read_json(p)) if p.exists() else None
