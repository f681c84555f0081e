"""Request features and the session split."""

from collections import Counter

from slmconvert.cluster.features import (
    mask_variables,
    request_template,
    tool_action_key,
)
from slmconvert.cluster.split import session_split
from slmconvert.invocation import Invocation, Request, Response, Source, ToolCall


def test_template_masks_variable_parts():
    a = request_template([{"role": "system", "content": "You help Acme. Today is 2026-11-25, ticket 48213, id 3f2a9c1e-0b4d-4e8a-9c1e-2b3d4e5f6a7b."}])
    b = request_template([{"role": "system", "content": "You help Acme. Today is 2025-01-02, ticket 7, id 00000000-1111-2222-3333-444444444444."}])
    assert a == b == "You help Acme. Today is <DATE>, ticket <N>, id <ID>."
    assert mask_variables("write to ana@example.org on Monday") == "write to <EMAIL> on <DAY>"


def test_template_without_system_prompt_uses_the_first_user_message_head():
    t = request_template([{"role": "user", "content": "Classify this ticket #123: printer on fire"}])
    assert t.startswith("[no system prompt] Classify this ticket #<N>")


def inv(calls):
    return Invocation(id="x", source=Source("f", "p", "line 1"), session_id="s", step=0,
                      request=Request(messages=[{"role": "user", "content": "hi"}]),
                      response=Response(content=None if calls else "hello", tool_calls=[ToolCall(n, a) for n, a in calls]))


def test_tool_action_key_is_names_and_argument_shape():
    assert tool_action_key(inv([("get", {"b": 1, "a": 2})])) == ("get", ("a", "b"))
    assert tool_action_key(inv([("z", {"k": 1}), ("a", {})])) == ("a+z", ("k",))
    assert tool_action_key(inv([])) is None


def make_rows(n_sessions=50, per=4):
    sessions, tasks = [], []
    for s in range(n_sessions):
        for j in range(per):
            sessions.append(f"s{s}")
            tasks.append("rare" if s < 10 and j == 0 else f"t{(s + j) % 3}")
    return sessions, tasks


def test_split_is_by_session_stratified_and_seeded():
    sessions, tasks = make_rows()
    sides = session_split(sessions, tasks, 0.2, seed=7)
    by_session = {}
    for s, side in zip(sessions, sides):
        assert by_session.setdefault(s, side) == side  # never on both sides
    n_test = sum(v == "test" for v in by_session.values())
    assert 8 <= n_test <= 12
    test_tasks = Counter(t for t, side in zip(tasks, sides) if side == "test")
    assert {"t0", "t1", "t2", "rare"} <= set(test_tasks)
    assert sides == session_split(sessions, tasks, 0.2, seed=7)
    assert sides != session_split(sessions, tasks, 0.2, seed=8)


def test_split_keeps_previous_sides_and_splits_only_new_sessions():
    sessions, tasks = make_rows()
    first = dict(zip(sessions, session_split(sessions, tasks, 0.2, seed=0)))
    more_s, more_t = make_rows(80)
    second = dict(zip(more_s, session_split(more_s, more_t, 0.2, seed=0, previous=first)))
    assert all(second[s] == side for s, side in first.items())
    new = [s for s in second if s not in first]
    assert 0 < sum(second[s] == "test" for s in new) < len(new)


def test_split_of_few_sessions_and_of_one():
    assert session_split(["a", "a", "b"], ["t", "t", "t"], 0.2, 0).count("test") in (1, 2)
    assert set(session_split(["a", "b", "c"], ["t"] * 3, 0.34, 0)) == {"train", "test"}
    assert session_split(["only", "only"], ["t", "t"], 0.2, 0) == ["train", "train"]
    assert set(session_split(["a", "b"], ["t", "t"], 0.0, 0)) == {"train"}
