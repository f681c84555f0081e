"""Verdicts per task, the headline share moved, and the price table."""

import pytest

from slmconvert.evaluate.prices import load_prices
from slmconvert.evaluate.verdicts import decide, share_moved

KW = dict(replace_at=0.9, hybrid_min_coverage=0.3, min_test_examples=5)


def test_replace_when_the_slm_is_right_often_enough():
    v = decide([True] * 19 + [False], [-0.1] * 20, **KW)
    assert v.verdict == "replace" and v.coverage == 1.0 and v.quality == 0.95


def test_hybrid_finds_the_confidence_threshold_that_keeps_quality():
    # confident answers are right, unconfident ones wrong: answer the confident 60%
    acc = [True] * 6 + [False] * 4
    conf = [-0.05, -0.06, -0.07, -0.08, -0.09, -0.1, -1.0, -1.1, -1.2, -1.3]
    v = decide(acc, conf, **KW)
    assert v.verdict == "hybrid" and v.threshold == -0.1 and v.coverage == 0.6 and v.hybrid_quality == 1.0


def test_keep_llm_when_confidence_does_not_separate_or_evidence_is_thin():
    acc = [True, False] * 5
    v = decide(acc, [-0.1] * 10, **KW)  # all equally confident: no threshold separates right from wrong
    assert v.verdict == "keep-llm" and "no confidence threshold" in v.reason
    thin = decide([True] * 3, [-0.1] * 3, **KW)
    assert thin.verdict == "keep-llm" and "only 3 test example" in thin.reason
    assert decide([], [], **KW).reason == "no test examples for this task"


def test_share_moved_weights_tasks_by_their_calls_tokens_and_cost():
    tasks = [
        {"size": 60, "prompt_tokens": 600, "completion_tokens": 60, "llm_cost_usd": 0.6, "coverage": 1.0, "verdict": "replace"},
        {"size": 30, "prompt_tokens": 3000, "completion_tokens": 300, "llm_cost_usd": 3.0, "coverage": 0.5, "verdict": "hybrid"},
        {"size": 10, "prompt_tokens": 100, "completion_tokens": 10, "llm_cost_usd": 0.1, "coverage": 0.0, "verdict": "keep-llm"},
    ]
    h = share_moved(tasks)
    assert h["share_calls"] == pytest.approx(0.75)
    assert h["share_tokens"] == pytest.approx((660 + 1650) / 4070, abs=1e-4)
    assert h["share_cost"] == pytest.approx(2.1 / 3.7, abs=1e-4)
    assert h["verdicts"] == {"replace": 1, "hybrid": 1, "keep-llm": 1}
    tasks[2]["llm_cost_usd"] = None
    assert share_moved(tasks)["share_cost"] is None  # an unknown cost is not silently zero


def test_price_lookup_by_longest_prefix():
    p = load_prices()
    assert p.lookup("gpt-4o").name == "gpt-4o"
    assert p.lookup("gpt-4o-2024-08-06").name == "gpt-4o"
    assert p.lookup("gpt-4o-mini-2024-07-18").name == "gpt-4o-mini"
    assert p.lookup("openai/gpt-4.1-nano").name == "gpt-4.1-nano"
    assert p.lookup("my-own-llm") is None and p.lookup(None) is None
    assert p.cost("gpt-4o", 1_000_000, 100_000) == pytest.approx(2.5 + 1.0)
