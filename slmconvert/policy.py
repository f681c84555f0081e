"""The routing policy: whether `serve` returns the SLM's answer or calls the LLM. One module, shared:
`evaluate` fits and verifies it, `serve` loads it from `WS/eval/policy.json` and applies it.

What the policy sees is what `serve` sees: the call site, the SLM's own answer (its task: the tool it
called, or "text"), the answer's confidence (mean token log-probability), and whether the answer is
valid (a tool the request offers, arguments valid against that tool's JSON schema) — and, before any
generation, how familiar the request is: the cosine similarity of its prompting turn (the user message
or tool results it answers) to the nearest of the site's training requests. A request less familiar
than all but `novelty_alpha` of the calibration requests goes to the LLM (split-conformal: on traffic
like the calibration sessions at most about that share of familiar requests is turned away), so an
off-topic question is not answered by whatever site the router found nearest.

A rule per (site, answer key) says "slm at confidence >= t" or "llm". It is fitted on *calibration*
sessions: of the calls where the SLM gave that kind of answer, the lowest threshold is kept whose
one-sided Clopper-Pearson lower bound (at `confidence_level`) of the share agreeing with the LLM
reaches `target`. It is then measured on *verification* sessions, which nothing was tuned on: the
realised agreement and coverage with their intervals. Too little evidence means the LLM.
This is selective prediction (risk-coverage, Geifman & El-Yaniv 2017) with a binomial bound.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from slmconvert.registry import Registry

POLICY_VERSION = 2
TEXT_KEY = "text"


# --------------------------------------------------------------------------- intervals


def clopper_pearson(k: float, n: float, level: float = 0.95) -> tuple[float, float]:
    """Exact two-sided binomial interval; its lower end at (1 - level) * 2 is the one-sided bound. k and n
    may be fractional (an effective sample size)."""
    from scipy.stats import beta

    if n <= 0:
        return 0.0, 1.0
    alpha = 1 - level
    lo = 0.0 if k <= 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k >= n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def lower_bound(k: int, n: int, level: float = 0.95) -> float:
    """One-sided lower confidence bound of a binomial proportion (Clopper-Pearson)."""
    from scipy.stats import beta

    return 0.0 if n == 0 or k == 0 else float(beta.ppf(1 - level, k, n - k + 1))


def weighted_share(flags: Sequence[bool], weights: Sequence[float], level: float = 0.95) -> tuple[float | None, list[float]]:
    """Share of `weights` where `flags` hold, with a Clopper-Pearson interval at the Kish effective sample
    size (sum w)^2 / sum w^2: a stratified sample re-weighted to the traffic mix has less information
    than its raw count."""
    W = float(sum(weights))
    if not W:
        return None, [0.0, 1.0]
    p = sum(w for f, w in zip(flags, weights) if f) / W
    n = W * W / float(sum(w * w for w in weights))
    lo, hi = clopper_pearson(p * n, n, level)
    return round(p, 4), [round(lo, 4), round(hi, 4)]


# --------------------------------------------------------------------------- what serve can see


confidence_signals: "Registry[Callable[[Mapping[str, Any]], float | None]]" = Registry("confidence signal")
AUTO = "auto"  # evaluate.confidence_signal: the signal that best separates right from wrong on calibration


def _spans(generation: Mapping[str, Any]) -> tuple[list[float], list[tuple[int, int]]] | None:
    """The token log-probabilities and each token's character span in the answer text."""
    lps, toks = generation.get("logprobs"), generation.get("tokens")
    if not lps or not toks or len(lps) != len(toks):
        return None
    spans, pos = [], 0
    for t in toks:
        spans.append((pos, pos + len(t)))
        pos += len(t)
    return lps, spans


def _over(generation: Mapping[str, Any], lo: int, hi: int) -> list[float]:
    got = _spans(generation)
    if got is None:
        return []
    lps, spans = got
    return [lp for lp, (a, b) in zip(lps, spans) if a < hi and b > lo]


_NAME = re.compile(r'<tool_call>\s*\{\s*"name"\s*:\s*"([^"]*)"')
_ARGS_KEY = re.compile(r'"arguments"\s*:\s*')


def _arguments_span(text: str) -> tuple[int, int] | None:
    """Where the first tool call's arguments stand in the answer: their JSON value, read as JSON (a string in them may
    hold braces or a `</tool_call>`), or, cut off by the budget, the rest of the answer. None without a call."""
    import json

    m = _NAME.search(text)
    k = _ARGS_KEY.search(text, m.end()) if m else None
    if k is None:
        return None
    try:
        _, end = json.JSONDecoder().raw_decode(text, k.end())
    except json.JSONDecodeError:
        end = len(text)
    return k.end(), end


@confidence_signals.register("mean_logprob")
def _mean_logprob(generation: Mapping[str, Any]) -> float | None:
    """Mean log-probability of the generated tokens: the default before calibration picks one."""
    return generation.get("mean_logprob")


@confidence_signals.register("min_logprob")
def _min_logprob(generation: Mapping[str, Any]) -> float | None:
    """The least likely token of the answer: one garbled id digit is enough to be wrong."""
    lps = generation.get("logprobs")
    return min(lps) if lps else generation.get("mean_logprob")


@confidence_signals.register("first_token")
def _first_token(generation: Mapping[str, Any]) -> float | None:
    """The first token's log-probability: the model's decision to call a tool or to reply."""
    lps = generation.get("logprobs")
    return lps[0] if lps else generation.get("mean_logprob")


@confidence_signals.register("tool_name")
def _tool_name(generation: Mapping[str, Any]) -> float | None:
    """Mean log-probability over the tool name (a text reply: over the whole answer)."""
    m = _NAME.search(generation.get("text") or "")
    vals = _over(generation, m.start(1), m.end(1)) if m else []
    return sum(vals) / len(vals) if vals else generation.get("mean_logprob")


@confidence_signals.register("argument_values")
def _argument_values(generation: Mapping[str, Any]) -> float | None:
    """The least likely token inside the arguments (a text reply: of the whole answer)."""
    span = _arguments_span(generation.get("text") or "")
    vals = _over(generation, *span) if span else []
    return min(vals) if vals else _min_logprob(generation)


def all_signals(generation: Mapping[str, Any]) -> dict[str, float | None]:
    return {name: fn(generation) for name, fn in confidence_signals}


def confidence_of(generation: Mapping[str, Any], signal: str = "mean_logprob") -> float | None:
    """The answer's confidence by the named signal; evaluate and serve both ask here.
    `generation`: text, new_tokens, mean_logprob, logprobs, tokens."""
    return confidence_signals.get("mean_logprob" if signal == AUTO else signal)(generation)


def signal_auroc(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """How well each signal separates agreeing from disagreeing answers (ROC AUC), per site and over all;
    rows: valid calibration answers with `site`, `agrees` and `signals`."""
    from collections import defaultdict

    from sklearn.metrics import roc_auc_score

    by_site: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_site[r["site"]].append(r)
    out: dict[str, dict[str, float | None]] = {}
    for name, _ in confidence_signals:
        out[name] = {}
        for site, rs in [("all", list(rows)), *sorted(by_site.items())]:
            pts = [(r["signals"].get(name), bool(r["agrees"])) for r in rs if r["signals"].get(name) is not None]
            labels = {a for _, a in pts}
            out[name][site] = (round(float(roc_auc_score([a for _, a in pts], [v for v, _ in pts])), 4)
                               if len(labels) == 2 else None)
    return out


def choose_signal(auroc: dict[str, dict[str, float | None]], default: str = "mean_logprob") -> str:
    """The signal with the highest AUROC over all calibration answers; the default when none can be measured
    (every answer agrees, or none does)."""
    scored = [(v["all"], name) for name, v in auroc.items() if v.get("all") is not None]
    if not scored:
        return default
    best = max(scored)
    return default if auroc.get(default, {}).get("all") == best[0] else best[1]


def request_text(messages: list[dict]) -> str:
    """What the request gate compares: the turn that prompts the call (user message or tool results)."""
    from slmconvert.cluster.features import prompting_turn

    return prompting_turn(messages, 300) or " "


class Familiarity:
    """Per site, unit embeddings of its training requests' prompting turns; a request's familiarity is its
    cosine similarity to the nearest of them. Saved beside the policy (familiarity.npz), with what embedded them
    (`encoder`: slmconvert.embeddings.GateEncoder.id) and that encoder's vectors of the probe texts, so that serve
    embeds requests as the thresholds were fitted. References are kept at float16 (the saved precision) from the start:
    evaluate scores calls with exactly the references serve loads."""

    MAX_REFERENCES = 3000

    def __init__(self, refs: dict[str, Any], encoder: str = "float", probe: Any = None):
        import numpy as np

        self.refs = {k: np.asarray(v, dtype=np.float16).astype(np.float32) for k, v in refs.items()}
        self.encoder, self.probe = encoder, probe

    def score(self, site: str, vecs) -> list[float | None]:
        import numpy as np

        ref = self.refs.get(site)
        if ref is None or not len(ref):
            return [None] * len(vecs)
        sims = np.asarray(vecs, dtype=np.float32) @ ref.astype(np.float32).T
        return [round(float(x), 4) for x in sims.max(axis=1)]

    def save(self, path) -> None:
        import numpy as np

        from slmconvert.io import atomic_path

        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            meta = {"meta:encoder": np.array(self.encoder)}
            if self.probe is not None:
                meta["meta:probe"] = np.asarray(self.probe, dtype=np.float32)
            np.savez_compressed(f, **{f"site:{k}": v.astype(np.float16) for k, v in self.refs.items()}, **meta)

    @classmethod
    def load(cls, path) -> "Familiarity":
        """A file from before `encoder` was saved was embedded by the model as it is: float."""
        import numpy as np

        with np.load(path) as z:
            refs = {k.split(":", 1)[1]: z[k].astype(np.float32) for k in z.files if k.startswith("site:")}
            encoder = str(z["meta:encoder"]) if "meta:encoder" in z.files else "float"
            probe = z["meta:probe"].astype(np.float32) if "meta:probe" in z.files else None
        return cls(refs, encoder, probe)


def conformal_floor(scores: Sequence[float], alpha: float) -> tuple[float | None, float | None]:
    """The k-th lowest calibration score, k = max(1, floor(alpha * (n + 1))): a new request as familiar as
    calibration requests falls below it with probability at most k / (n + 1) (split conformal)."""
    import math

    vals = sorted(s for s in scores if s is not None)
    if not vals:
        return None, None
    k = max(1, math.floor(alpha * (len(vals) + 1)))
    return vals[k - 1], round(k / (len(vals) + 1), 4)


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


class Invalid(str):
    """Why an answer cannot be returned: the text (for people) and its kind (for counts), set where it is made."""

    kind: str

    def __new__(cls, text: str, kind: str) -> "Invalid":
        out = super().__new__(cls, text)
        out.kind = kind
        return out


def invalid_reason(response, tools: list[dict] | None, well_formed: bool = True) -> Invalid | None:
    """Why the SLM's answer cannot be returned as it is: broken JSON, a tool the request does not offer,
    arguments the tool's JSON schema rejects. None when it is valid."""
    import jsonschema

    if not well_formed:
        return Invalid("the SLM's tool call is not valid JSON", "broken tool call")
    if not response.tool_calls or not tools:
        return None
    schemas = {}
    for t in tools:
        fn = t.get("function", t) if isinstance(t, dict) else {}
        if isinstance(fn.get("name"), str):
            schemas[fn["name"]] = fn.get("parameters") or {"type": "object"}
    for call in response.tool_calls:
        if call.name not in schemas:
            return Invalid(f"the SLM called {call.name!r}, a tool the request does not offer", "tool not offered")
        try:
            jsonschema.validate(call.arguments, schemas[call.name])
        except jsonschema.ValidationError as e:
            where = "/".join(str(p) for p in e.absolute_path) or "arguments"
            return Invalid(f"the arguments of {call.name} do not match its schema ({where}: {e.message[:120]})",
                           "arguments fail the tool's schema")
        except jsonschema.SchemaError:
            continue  # a broken schema in the log is not the SLM's fault
    return None


# --------------------------------------------------------------------------- the policy


@dataclass
class Decision:
    use_slm: bool
    reason: str
    key: str | None = None
    why: str = "answered"  # the kind of reason, for counts (verify's not_answered_because); `reason` is for people


class Policy:
    def __init__(self, doc: dict[str, Any]):
        self.doc = doc
        self.rules: dict[str, dict[str, dict[str, Any]]] = doc.get("rules", {})

    def admit(self, site: str, similarity: float | None) -> Decision | None:
        """The request gate: a Decision for the LLM when the request is unlike the site's training requests."""
        gate = self.doc.get("requests", {}).get(site) or {}
        t = gate.get("min_similarity")
        if t is not None and similarity is not None and similarity < t:
            return Decision(False, f"request unlike site {site}'s training calls (similarity {similarity:.3f} < {t:.3f})",
                            why="unfamiliar request")
        return None

    def decide(self, site: str, key: str | None, confidence: float | None, invalid: str | None,
               similarity: float | None = None) -> Decision:
        refused = self.admit(site, similarity)
        if refused is not None:
            return refused
        if invalid is not None:
            return Decision(False, invalid, key, getattr(invalid, "kind", "invalid answer"))
        if key is None:
            return Decision(False, "the SLM's answer matches no task of the site", key, "answer of no known task")
        rule = self.rules.get(site, {}).get(key)
        if rule is None:
            return Decision(False, f"no rule for {key} answers at site {site}", key, "no calibration evidence for this answer")
        if rule["action"] != "slm":
            return Decision(False, f"{key}: {rule['reason']}", key, rule.get("why") or _legacy_why(rule))
        t = rule["min_confidence"]
        if t is not None and (confidence is None or confidence < t):
            shown = "n/a" if confidence is None else f"{confidence:.3f}"
            return Decision(False, f"{key}: confidence {shown} below {t:.3f}", key, "confidence below threshold")
        return Decision(True, f"{key}: confidence >= {t:.3f}" if t is not None else f"{key}: rule slm", key)

    def servable(self, site: str) -> bool:
        return any(r["action"] == "slm" for r in self.rules.get(site, {}).values())


def _legacy_why(rule: dict[str, Any]) -> str:
    """The kind of an llm rule's reason in a policy written before rules carried it."""
    return "too little evidence" if str(rule.get("reason", "")).startswith("too little evidence") else "agreement too low"


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
        need = agreeing_needed(target, level)
        little = agree < need
        why = (f"too little evidence: {n} calibration answer(s), at least {need} agreeing ones are needed for a "
               f"{level:.0%} lower bound of {target:.0%}" if little else
               f"no confidence threshold gives a {level:.0%} lower bound of agreement >= {target:.0%} "
               f"({agree}/{n} agree overall)")
        return {"action": "llm", "min_confidence": None, "reason": why,
                "why": "too little evidence" if little else "agreement too low", "calibration": evidence}
    k, c, good, lb = best
    return {"action": "slm", "min_confidence": round(c, 6) if c != float("-inf") else None,
            "reason": f"{good}/{k} calibration answers at confidence >= threshold agree; lower bound {lb:.3f} >= {target:.2f}",
            "calibration": {**evidence, "kept": k, "kept_agree": good, "lower_bound": round(lb, 4)}}


def agreeing_needed(target: float, level: float) -> int:
    """Fewest answers, all agreeing, whose lower bound reaches the target: (1-level)^(1/n) >= target."""
    import math

    return max(1, math.ceil(math.log(1 - level) / math.log(target))) if 0 < target < 1 else 1


def fit_policy(rows: Sequence[dict[str, Any]], calibration: set[str], *, target: float, level: float,
               seed: int, sites: Iterable[str], novelty_alpha: float = 0.02) -> dict[str, Any]:
    """rows: the chosen adapters' answers on test calls, each with site, session, key, confidence, invalid,
    agrees and (optionally) similarity, the request's familiarity. The request gate is fitted first; the
    answer rules on the calibration calls it admits."""
    from collections import defaultdict

    groups: dict[tuple[str, str], list[tuple[float | None, bool]]] = defaultdict(list)
    invalid = defaultdict(int)
    requests: dict[str, dict[str, Any]] = {}
    by_site: dict[str, list[float | None]] = defaultdict(list)
    for r in rows:
        if r["session"] in calibration:
            by_site[r["site"]].append(r.get("similarity"))
    for site, sims in sorted(by_site.items()):
        t, bound = conformal_floor(sims, novelty_alpha)
        requests[site] = {"min_similarity": t, "calibration_calls": sum(x is not None for x in sims),
                          "alpha": novelty_alpha, "familiar_turned_away_at_most": bound}
    gate = Policy({"requests": requests})
    for r in rows:
        if r["session"] not in calibration or r["key"] is None:
            continue
        if gate.admit(r["site"], r.get("similarity")) is not None:
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
            "split": {"seed": seed, "method": "sha256(seed:session) parity; even = calibration"},
            "requests": requests, "rules": rules}


def verify(policy: Policy, rows: Sequence[dict[str, Any]], verification: set[str], level: float) -> dict[str, Any]:
    """What the policy does on verification sessions, which nothing was tuned on, overall and per site:
    of the sampled calls, how many the SLM answers and how many of those agree with the LLM (exact
    intervals), and re-weighted to the traffic mix (each row's `weight`: test calls it stands for;
    `tokens`, `cost`: the LLM's for that call) the share of calls, tokens and cost moved and the
    agreement the traffic would see (intervals at the effective sample size)."""
    from collections import defaultdict

    out: dict[str, Any] = {}
    per_site: dict[str, list[tuple[bool, bool, dict[str, Any]]]] = defaultdict(list)
    reasons: dict[str, int] = defaultdict(int)
    for r in rows:
        if r["session"] not in verification:
            continue
        d = policy.decide(r["site"], r["key"], r["confidence"], r["invalid"], r.get("similarity"))
        if not d.use_slm:
            reasons[d.why] += 1
        per_site[r["site"]].append((d.use_slm, bool(r["agrees"]), r))
    for site, pts in [("all", [p for v in per_site.values() for p in v]), *sorted(per_site.items())]:
        n = len(pts)
        answered = [a for used, a, _ in pts if used]
        k = len(answered)
        agree = sum(answered)
        lo, hi = clopper_pearson(agree, k, level)
        clo, chi = clopper_pearson(k, n, level)
        used = [u for u, _, _ in pts]
        w = [float(r.get("weight") or 1.0) for _, _, r in pts]
        share, share_iv = weighted_share(used, w, level)
        tok_w = [wi * float(r.get("tokens") or 0) for wi, (_, _, r) in zip(w, pts)]
        tok_share, tok_iv = weighted_share(used, tok_w, level) if sum(tok_w) else (None, None)
        costs = [r.get("cost") for _, _, r in pts]
        cost_share, cost_iv = (weighted_share(used, [wi * c for wi, c in zip(w, costs)], level)
                               if costs and all(c is not None for c in costs) and sum(costs) else (None, None))
        w_agree, w_agree_iv = weighted_share([a for u, a, _ in pts if u], [wi for wi, (u, _, _) in zip(w, pts) if u], level)
        out[site] = {"calls": n, "answered": k, "agree": agree,
                     "agreement": round(agree / k, 4) if k else None, "agreement_interval": [round(lo, 4), round(hi, 4)],
                     "coverage": round(k / n, 4) if n else 0.0, "coverage_interval": [round(clo, 4), round(chi, 4)],
                     "share_calls": share if share is not None else 0.0, "share_calls_interval": share_iv,
                     "share_tokens": tok_share, "share_tokens_interval": tok_iv,
                     "share_cost": cost_share, "share_cost_interval": cost_iv,
                     "agreement_weighted": w_agree if k else None, "agreement_weighted_interval": w_agree_iv if k else None}
    out["all"]["not_answered_because"] = dict(sorted(reasons.items(), key=lambda kv: -kv[1]))
    return out


def load_policy(path) -> Policy | None:
    """The policy evaluate wrote (None when there is none); a policy of another version is a StageError."""
    from pathlib import Path

    from slmconvert.errors import StageError
    from slmconvert.io import read_json

    p = Path(path)
    if not p.exists():
        return None
    doc = read_json(p)
    if doc.get("version") != POLICY_VERSION:
        raise StageError(f"{p} is routing policy version {doc.get('version')}, this slmconvert applies version "
                             f"{POLICY_VERSION}: re-run `slmconvert evaluate --force`")
    return Policy(doc)


def load_familiarity(path) -> Familiarity | None:
    from pathlib import Path

    return Familiarity.load(path) if Path(path).exists() else None
