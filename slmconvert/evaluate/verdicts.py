"""Per-task verdicts and the headline: what share of the agent's calls, tokens and cost moves to SLMs.

A test example is *acceptable* when the SLM's answer could stand in for the LLM's: for a tool
call, the right function with BFCL-equivalent arguments; for a text reply, a reply (not a tool
call) judged close enough (LLM-as-judge score, else embedding similarity, at their thresholds).

Per task, on the site's chosen adapter:
- `replace`: acceptable rate >= `replace_at`;
- `hybrid`: the SLM answers when its confidence (mean token log-probability) clears a threshold,
  the LLM otherwise; chosen when some threshold keeps the acceptable rate of the answers above it
  >= `replace_at` while covering >= `hybrid_min_coverage` of the task's calls;
- `keep-llm`: otherwise, or when the task has fewer than `min_test_examples` test examples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence


@dataclass
class Verdict:
    verdict: str  # replace | hybrid | keep-llm
    reason: str
    quality: float | None  # acceptable rate on the test examples
    n: int
    threshold: float | None = None  # hybrid: minimum mean log-probability
    coverage: float = 0.0  # share of the task's calls the SLM answers (1 replace, 0 keep-llm)
    hybrid_quality: float | None = None  # acceptable rate of the answers above the threshold

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def decide(acceptable: Sequence[bool], confidence: Sequence[float | None], *, replace_at: float,
           hybrid_min_coverage: float, min_test_examples: int) -> Verdict:
    n = len(acceptable)
    if n == 0:
        return Verdict("keep-llm", "no test examples for this task", None, 0)
    quality = sum(acceptable) / n
    if n < min_test_examples:
        return Verdict("keep-llm", f"only {n} test example(s) (evaluate.min_test_examples={min_test_examples})", quality, n)
    if quality >= replace_at:
        return Verdict("replace", f"{quality:.0%} acceptable >= {replace_at:.0%}", quality, n, coverage=1.0)
    scored = sorted(((c, a) for c, a in zip(confidence, acceptable) if c is not None), key=lambda x: -x[0])
    best: tuple[int, float] | None = None
    good = 0
    for k, (c, a) in enumerate(scored, start=1):
        good += a
        # a threshold must separate: the next answer is strictly less confident
        if k < len(scored) and scored[k][0] == c:
            continue
        if good / k >= replace_at and k / n >= hybrid_min_coverage:
            best = (k, c)
    if best is not None:
        k, c = best
        hq = sum(a for _, a in scored[:k]) / k
        return Verdict("hybrid", f"answers with confidence >= {c:.3f} are {hq:.0%} acceptable and cover {k / n:.0%} of calls",
                       quality, n, threshold=c, coverage=k / n, hybrid_quality=hq)
    return Verdict("keep-llm", f"{quality:.0%} acceptable < {replace_at:.0%}, and no confidence threshold covers "
                               f">= {hybrid_min_coverage:.0%} of calls at that quality", quality, n)


def share_moved(tasks: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Headline over all tasks of the log (tasks.json sizes, not just the test split).

    Each task dict: size, prompt_tokens, completion_tokens, llm_cost_usd (or None), coverage.
    """
    tot = {"calls": 0.0, "tokens": 0.0, "cost": 0.0}
    moved = {"calls": 0.0, "tokens": 0.0, "cost": 0.0}
    cost_known = True
    for t in tasks:
        f = t.get("coverage", 0.0)
        tokens = (t.get("prompt_tokens") or 0) + (t.get("completion_tokens") or 0)
        tot["calls"] += t["size"]
        moved["calls"] += f * t["size"]
        tot["tokens"] += tokens
        moved["tokens"] += f * tokens
        if t.get("llm_cost_usd") is None:
            cost_known = False
        else:
            tot["cost"] += t["llm_cost_usd"]
            moved["cost"] += f * t["llm_cost_usd"]
    out = {
        "share_calls": round(moved["calls"] / tot["calls"], 4) if tot["calls"] else 0.0,
        "share_tokens": round(moved["tokens"] / tot["tokens"], 4) if tot["tokens"] else 0.0,
        "share_cost": round(moved["cost"] / tot["cost"], 4) if cost_known and tot["cost"] else None,
        "calls_moved": round(moved["calls"], 1), "calls_total": int(tot["calls"]),
        "tokens_moved": int(moved["tokens"]), "tokens_total": int(tot["tokens"]),
        "llm_cost_moved_usd": round(moved["cost"], 4) if cost_known else None,
        "llm_cost_total_usd": round(tot["cost"], 4) if cost_known else None,
        "verdicts": {v: sum(1 for t in tasks if t.get("verdict") == v) for v in ("replace", "hybrid", "keep-llm")},
    }
    return out
