"""The routing policy: gated on the SLM's own answer, fitted on calibration sessions, verified on others."""

from slmconvert.evaluate.verdicts import decide
from slmconvert.invocation import Response, ToolCall
from slmconvert.policy import Policy, fit_policy, invalid_reason, lower_bound, split_sessions, verify

TOOLS = [{"type": "function", "function": {"name": "get_user", "parameters": {
    "type": "object", "properties": {"user_id": {"type": "string"}}, "required": ["user_id"], "additionalProperties": False}}}]


def _rows():
    """An SLM that over-predicts get_user: right on the LLM's get_user calls, and also calling it where the LLM replied in text."""
    rows = []
    for i in range(240):
        session = f"s{i}"
        if i % 2 == 0:  # the LLM called get_user; the SLM too, right 116 times of 120
            rows.append({"site": "a", "task": "tool:get_user", "session": session, "key": "tool:get_user",
                         "confidence": -0.05 - (i % 7) * 0.01, "agrees": i % 60 != 0, "invalid": None})
        else:  # the LLM replied in text; the SLM calls get_user on two thirds of them, confidently
            wrong = i % 3 != 0
            rows.append({"site": "a", "task": "text", "session": session, "key": "tool:get_user" if wrong else "text",
                         "confidence": -0.04 if wrong else -0.5, "agrees": not wrong and i % 5 != 0, "invalid": None})
    return rows


def test_a_tool_the_slm_over_predicts_is_refused_though_the_old_verdict_moves_it():
    rows = _rows()
    # the old verdict: grouped by the LLM's task, the SLM is right on 97% of get_user calls -> replace
    llm_task = [r for r in rows if r["task"] == "tool:get_user"]
    old = decide([r["agrees"] for r in llm_task], [r["confidence"] for r in llm_task], replace_at=0.9,
                 hybrid_min_coverage=0.3, min_test_examples=5)
    assert old.verdict == "replace" and old.quality > 0.95
    # the policy: grouped by the SLM's own answer, only 59% of its get_user answers agree -> the LLM answers them
    cal, ver = split_sessions((r["session"] for r in rows), seed=0)
    assert cal and ver and not cal & ver
    doc = fit_policy(rows, cal, target=0.9, level=0.95, seed=0, sites=["a"])
    rule = doc["rules"]["a"]["tool:get_user"]
    assert rule["action"] == "llm" and rule["calibration"]["agreement"] < 0.7
    checked = verify(Policy(doc), rows, ver, 0.95)["a"]
    assert checked["answered"] == 0 and checked["coverage"] == 0.0  # serve returns none of those answers


def test_a_kind_of_answer_with_enough_agreeing_evidence_is_moved_and_verified_with_intervals():
    rows = [{"site": "a", "task": "tool:get_user", "session": f"s{i}", "key": "tool:get_user", "confidence": -0.01 * (i % 10),
             "agrees": True, "invalid": None} for i in range(400)]
    cal, ver = split_sessions((r["session"] for r in rows), seed=3)
    doc = fit_policy(rows, cal, target=0.95, level=0.95, seed=3, sites=["a"])
    rule = doc["rules"]["a"]["tool:get_user"]
    assert rule["action"] == "slm" and rule["calibration"]["lower_bound"] >= 0.95
    v = verify(Policy(doc), rows, ver, 0.95)["all"]
    assert v["answered"] == v["calls"] == len(ver) and v["agreement"] == 1.0
    lo, hi = v["agreement_interval"]
    assert 0.95 < lo < 1.0 == hi


def test_too_little_evidence_goes_to_the_llm_and_says_so():
    assert lower_bound(59, 59) >= 0.95 > lower_bound(58, 58)
    rows = [{"site": "a", "task": "text", "session": f"s{i}", "key": "text", "confidence": -0.1, "agrees": True, "invalid": None}
            for i in range(30)]
    cal, _ = split_sessions((r["session"] for r in rows), seed=0)
    rule = fit_policy(rows, cal, target=0.95, level=0.95, seed=0, sites=["a"])["rules"]["a"]["text"]
    assert rule["action"] == "llm" and "too little evidence" in rule["reason"] and "59" in rule["reason"]
    assert rule["why"] == "too little evidence"
    # enough answers, too many of them wrong: a different kind of reason, counted apart by verify
    rows = [{**r, "session": f"t{i}", "agrees": i % 5 != 0} for i, r in enumerate(rows * 10)]
    cal, ver = split_sessions((r["session"] for r in rows), seed=0)
    doc = fit_policy(rows, cal, target=0.95, level=0.95, seed=0, sites=["a"])
    assert doc["rules"]["a"]["text"]["why"] == "agreement too low"
    assert verify(Policy(doc), rows, ver, 0.95)["all"]["not_answered_because"] == {"agreement too low": len(ver)}


def test_a_lower_target_moves_more_and_says_how_well_what_it_moves_agrees():
    """evaluate's what-if over targets: each fitted on calibration, verified on the verification sessions."""
    from slmconvert.evaluate.routing import at_target

    rows = [{"site": "a", "task": "t", "session": f"s{i}", "key": "text", "confidence": -0.1, "agrees": i % 10 != 0,
             "invalid": None} for i in range(400)]
    cal, ver = split_sessions((r["session"] for r in rows), seed=0)
    at = {t: at_target(rows, cal, ver, target=t, level=0.95, seed=0, sites=["a"], novelty_alpha=0.02) for t in (0.8, 0.95)}
    assert at[0.95]["share_calls"] == 0.0 and at[0.95]["kinds_to_slm"] == 0 and at[0.95]["agreeing_needed_per_kind"] == 59
    low = at[0.8]
    assert low["kinds_to_slm"] == 1 and low["share_calls"] == 1.0 and low["calls"] == len(ver) and low["answered"] == len(ver)
    assert low["agreement_interval"][0] <= low["agreement"] <= low["agreement_interval"][1]
    assert abs(low["agreement"] - 0.9) < 0.05  # what the moved calls really do: about 90% agree, not the 80% asked for


def test_why_calls_stay_with_the_llm_is_counted_by_kind_whatever_the_tools_are_called():
    """not_answered_because counts kinds of reasons; a tool named like a reason ("confidence", "schema") must not
    be counted as one (the counts were once read off the reason text)."""
    key = "tool:update_confidence_schema"
    doc = {"rules": {"a": {key: {"action": "llm", "min_confidence": None, "reason": "too little evidence: 3 calibration answer(s)"},
                           "text": {"action": "slm", "min_confidence": -0.2, "reason": "x"}}}}
    rows = [{"site": "a", "session": "s1", "key": key, "confidence": -0.1, "agrees": True, "invalid": None},
            {"site": "a", "session": "s1", "key": "text", "confidence": -0.5, "agrees": True, "invalid": None},
            {"site": "a", "session": "s1", "key": "text", "confidence": -0.1, "agrees": True,
             "invalid": invalid_reason(Response(None, [ToolCall("confidence_schema", {})]), TOOLS)},
            {"site": "a", "session": "s1", "key": None, "confidence": -0.1, "agrees": False, "invalid": None},
            {"site": "a", "session": "s1", "key": "tool:no_rule_confidence", "confidence": -0.1, "agrees": False, "invalid": None}]
    why = verify(Policy(doc), rows, {"s1"}, 0.95)["all"]["not_answered_because"]
    assert why == {"too little evidence": 1, "confidence below threshold": 1, "tool not offered": 1,
                   "answer of no known task": 1, "no calibration evidence for this answer": 1}


def test_invalid_answers_never_reach_the_agent():
    ok = Response(None, [ToolCall("get_user", {"user_id": "u1"})])
    assert invalid_reason(ok, TOOLS) is None
    assert "does not offer" in invalid_reason(Response(None, [ToolCall("delete_user", {})]), TOOLS)
    assert "schema" in invalid_reason(Response(None, [ToolCall("get_user", {"user_id": 7})]), TOOLS)
    assert "schema" in invalid_reason(Response(None, [ToolCall("get_user", {})]), TOOLS)
    assert "not valid JSON" in invalid_reason(ok, TOOLS, well_formed=False)
    doc = {"rules": {"a": {"tool:get_user": {"action": "slm", "min_confidence": -0.2, "reason": "x"}}}}
    d = Policy(doc).decide("a", "tool:get_user", -0.1, invalid_reason(Response(None, [ToolCall("get_user", {})]), TOOLS))
    assert not d.use_slm and "schema" in d.reason
    assert Policy(doc).decide("a", "tool:get_user", -0.1, None).use_slm
    assert not Policy(doc).decide("a", "tool:get_user", -0.3, None).use_slm


def test_an_off_topic_request_is_sent_to_the_llm_before_the_slm_answers(tmp_path):
    """The request gate: familiarity to the site's training requests, thresholded on calibration sessions."""
    import numpy as np

    from slmconvert.policy import Familiarity, conformal_floor

    rng = np.random.default_rng(0)
    topic = np.eye(16)[0]

    def unit(v):
        return v / np.linalg.norm(v)

    train = np.stack([unit(topic + 0.3 * rng.normal(size=16)) for _ in range(200)])
    fam = Familiarity({"a": train})
    fam.save(tmp_path / "f.npz")
    fam = Familiarity.load(tmp_path / "f.npz")  # what serve loads: float16 on disk, same answers
    on_topic = np.stack([unit(topic + 0.3 * rng.normal(size=16)) for _ in range(300)])
    off_topic = unit(np.eye(16)[5] + 0.1 * rng.normal(size=16))[None, :]
    sims = fam.score("a", on_topic)
    rows = [{"site": "a", "task": "text", "session": f"s{i}", "key": "text", "confidence": -0.1, "agrees": True,
             "invalid": None, "similarity": s} for i, s in enumerate(sims)]
    cal, ver = split_sessions((r["session"] for r in rows), seed=1)
    doc = fit_policy(rows, cal, target=0.9, level=0.95, seed=1, sites=["a"], novelty_alpha=0.02)
    gate = doc["requests"]["a"]
    n_cal = sum(r["session"] in cal for r in rows)
    assert gate["calibration_calls"] == n_cal and gate["familiar_turned_away_at_most"] <= 0.03
    policy = Policy(doc)
    [off] = fam.score("a", off_topic)
    d = policy.decide("a", "text", -0.01, None, off)
    assert not d.use_slm and "unlike site a's training calls" in d.reason
    assert policy.decide("a", "text", -0.01, None, max(sims)).use_slm
    # on held-out familiar traffic the gate turns away about alpha of it, not more
    v = verify(policy, rows, ver, 0.95)["all"]
    assert v["not_answered_because"].get("unfamiliar request", 0) <= 0.06 * v["calls"]
    assert conformal_floor([0.5, 0.1, 0.9], 0.02) == (0.1, 0.25)


def test_traffic_weighting_moves_the_headline_to_the_real_mix():
    """A rare task sampled as often as a common one must not count as often in the share moved."""
    from slmconvert.evaluate.generate import test_sample
    from slmconvert.policy import weighted_share

    by_task = {"common": [f"c{i}" for i in range(900)], "rare": [f"r{i}" for i in range(10)]}
    sample = test_sample(by_task, 100, seed=0, min_per_task=5)
    n = {t: sum(s.task == t for s in sample) for t in by_task}
    assert len(sample) == 100 and n["rare"] >= 5 and n["common"] >= 90
    w = {s.task: s.weight for s in sample}
    assert abs(w["common"] * n["common"] - 900) < 1e-6 and abs(w["rare"] * n["rare"] - 10) < 1e-6
    # the SLM answers every rare call and no common one: unweighted that looks like >= 5%, the traffic sees ~1%
    share, (lo, hi) = weighted_share([s.task == "rare" for s in sample], [s.weight for s in sample])
    assert abs(share - 10 / 910) < 1e-3 and lo < share < hi  # (Kish effective size: a conservative interval)
    assert sum(s.task == "rare" for s in sample) / len(sample) >= 0.05
    assert [s.inv for s in test_sample(by_task, 100, seed=0, min_per_task=5)] == [s.inv for s in sample]  # seeded
    assert len(test_sample(by_task, None, seed=0)) == 910
    many = {f"t{i}": [f"{i}-{j}" for j in range(5)] for i in range(8)}  # floors (8 x 3) above the limit
    assert len(test_sample(many, 6, seed=0, min_per_task=3)) == 6


def test_the_evidence_ceiling_says_what_the_test_sample_could_show_at_all():
    """0% moved can mean a poor SLM or a sample too small to show anything: at a 95% target a kind needs 59 agreeing
    calibration answers, whatever the SLM. The ceiling is what an SLM agreeing on every call could move, with the calls
    evaluated and with every test call evaluated, and it says which of the two is short."""
    from slmconvert.evaluate.routing import evidence_ceiling
    from slmconvert.policy import agreeing_needed

    need = agreeing_needed(0.95, 0.95)

    def rows(n):
        return [{"site": "a", "task": ("text:1", "text:2")[i % 16 == 0] if i % 8 == 0 else "tool:get_user", "session": f"s{i}", "weight": 1.0}
                for i in range(n)]

    def share_of_big(rs, sessions):
        mine = [r for r in rs if r["session"] in sessions]  # traffic-weighted
        return round(sum(r["weight"] for r in mine if r["task"].startswith("tool:")) / sum(r["weight"] for r in mine), 4)

    full = rows(480)  # every test call: ~210 calibration calls of the big kind, ~30 text replies (of two text tasks)
    cal, ver = split_sessions((r["session"] for r in full), seed=0)
    c = evidence_ceiling(full, cal, ver, need, 0.95)
    big, small = c["kinds"]
    assert big["key"] == "tool:get_user" and big["qualifies"] and big["calibration_sampled"] >= need
    assert not small["qualifies"] and small["calibration_in_test_split"] < need
    assert c["share_calls"] == c["share_calls_all_test"] == share_of_big(full, ver) and c["advice"] is None
    # a sample of a quarter of the big kind's calls, each standing for four: nothing can show with it, the big kind could
    sample = [{**r, "weight": 4.0} for r in full if r["task"].startswith("tool:")][::4] + [
        r for r in full if not r["task"].startswith("tool:")]
    c = evidence_ceiling(sample, cal, ver, need, 0.95)
    assert c["kinds"][0]["calibration_sampled"] < need <= c["kinds"][0]["calibration_in_test_split"]
    assert c["share_calls"] == 0.0 and c["share_calls_all_test"] == share_of_big(sample, ver)
    assert "evaluate more of the test calls" in c["advice"]
    # a test split too small for the target: more calls evaluated would not help
    small = rows(100)
    cal, ver = split_sessions((r["session"] for r in small), seed=0)
    c = evidence_ceiling(small, cal, ver, need, 0.95)
    assert c["share_calls"] == c["share_calls_all_test"] == 0.0 and "test split is too small" in c["advice"]
    assert evidence_ceiling(small, cal, ver, agreeing_needed(0.8, 0.95), 0.95)["share_calls"] > 0  # 14 needed: the big kind has them


def _generation(pieces: list[tuple[str, float]]) -> dict:
    return {"text": "".join(t for t, _ in pieces), "tokens": [t for t, _ in pieces], "logprobs": [lp for _, lp in pieces],
            "mean_logprob": sum(lp for _, lp in pieces) / len(pieces)}


def test_confidence_signals_read_the_parts_of_the_answer_they_name():
    """tool_name: the mean over the name's tokens; argument_values: the least likely token inside the arguments, read
    as JSON — a thought holding `}}</tool_call>` does not end them early, so an unsure token after it still counts."""
    from slmconvert.policy import all_signals

    gen = _generation([("<tool_call>", -0.01), ('{"name": "', -0.02), ("think", -0.5), ('", "arguments": ', -0.01),
                       ('{"thought": "a ', -0.03), ('}}</tool_call>', -0.04), (' b', -2.5), ('"}}', -0.02),
                       ("</tool_call>", -0.01)])
    s = all_signals(gen)
    assert s["tool_name"] == -0.5 and s["first_token"] == -0.01 and s["min_logprob"] == -2.5
    assert s["argument_values"] == -2.5  # the regex this replaced stopped at the first "}}</tool_call>": -0.04
    text = _generation([("I can help", -0.3), (" with that.", -0.1)])
    assert all_signals(text)["tool_name"] == text["mean_logprob"] and all_signals(text)["argument_values"] == -0.3
    cut = _generation([('<tool_call>{"name": "note", "arguments": {"text": "', -0.1), ("and on", -1.5)])
    assert all_signals(cut)["argument_values"] == -1.5  # cut off by the budget: the rest of the answer is its arguments
