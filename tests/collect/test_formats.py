"""Each log format, as a user would hand it over, ends up as the same normalised invocations."""

import json

import pytest

from slmconvert.collect.stage import run
from slmconvert.store import load_invocations
from slmconvert.workspace import Workspace
from tests.conftest import rr_record, write_jsonl


def collect(collect_config, tmp_path, *paths, **kw):
    cfg = collect_config(*paths, **kw)
    ws = Workspace(cfg.workspace)
    m = run(cfg, ws)
    return m, {i.id: i for i in load_invocations(ws)}, ws


def test_request_response_with_string_and_object_arguments(tmp_path, collect_config):
    log = write_jsonl(tmp_path / "gw.jsonl", [
        rr_record("where is order 7?", call=("get_order", '{"order_id": "7"}'), session="a",
                  timestamp=1735689600, latency_ms=812.5, usage={"prompt_tokens": 20, "completion_tokens": 5},
                  workload_id="support", client_id="web"),
        rr_record("and order 8?", call=("get_order", {"order_id": "8"}), session="b"),
        rr_record("thanks!", answer="You're welcome.", session="c"),
    ])
    m, invs, _ = collect(collect_config, tmp_path, log)
    assert m.counts["invocations"] == 3 and m.counts["tool_calls"] == 2 and m.counts["text"] == 1
    by_user = {i.request.messages[-1]["content"]: i for i in invs.values()}
    first = by_user["where is order 7?"]
    assert first.response.tool_calls[0].name == "get_order"
    assert first.response.tool_calls[0].arguments == {"order_id": "7"}  # parsed, not a string
    assert by_user["and order 8?"].response.tool_calls[0].arguments == {"order_id": "8"}
    assert first.timestamp == "2025-01-01T00:00:00Z"
    assert first.latency_ms == 812.5 and first.usage.prompt_tokens == 20
    assert first.agent == "support" and first.meta["client_id"] == "web"  # a client id never names the agent
    assert first.model == "gpt-4o" and first.hci is False
    assert by_user["thanks!"].hci is True and by_user["thanks!"].response.content == "You're welcome."


def test_trajectory_yields_one_invocation_per_assistant_message(tmp_path, collect_config):
    conv = {"conversation_id": "c-1", "reward": 1.0, "trial": 2, "history": [
        {"role": "system", "content": "You book rooms."},
        {"role": "user", "content": "A room for two, please."},
        {"role": "agent", "content": None, "tool_calls": [
            {"id": "t1", "type": "function", "function": {"name": "search_rooms", "arguments": "{\"guests\": 2}"}}]},
        {"role": "tool", "tool_call_id": "t1", "content": "[{\"room\": 12}]"},
        {"role": "agent", "content": "Room 12 is free."},
        {"role": "user", "content": "Great."},
    ]}
    f = tmp_path / "convs.json"
    f.write_text(json.dumps([conv]))
    m, invs, _ = collect(collect_config, tmp_path, f)
    assert m.extra["formats"] == {"trajectory": 1}
    steps = sorted(invs.values(), key=lambda i: i.step)
    assert [i.step for i in steps] == [0, 1]
    # the prompt is every message before the assistant message; 'agent' is mapped to 'assistant'
    assert [x["role"] for x in steps[0].request.messages] == ["system", "user"]
    assert [x["role"] for x in steps[1].request.messages] == ["system", "user", "assistant", "tool"]
    assert steps[1].request.messages[2]["tool_calls"][0]["function"]["arguments"] == {"guests": 2}
    assert steps[0].session_id == steps[1].session_id == "conversation_id:c-1"
    assert steps[0].meta["reward"] == 1.0 and steps[0].meta["trial"] == 2
    # the simulated user's last message is never an agent call
    assert all(i.request.messages[-1]["content"] != "Great." for i in invs.values())


def test_openai_finetune_format_honours_weight_zero(tmp_path, collect_config):
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]
    rec = {"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "old answer", "weight": 0},
        {"role": "user", "content": "look up cats"},
        {"role": "assistant", "tool_calls": [{"id": "x", "type": "function", "function": {"name": "lookup", "arguments": "{\"q\": \"cats\"}"}}]},
    ], "tools": tools}
    log = write_jsonl(tmp_path / "ft.jsonl", [rec])
    m, invs, _ = collect(collect_config, tmp_path, log)
    assert m.extra["formats"] == {"openai-finetune": 1}
    assert m.counts["invocations"] == 1 and m.counts["dropped_not_a_target"] == 1
    inv = next(iter(invs.values()))
    assert inv.request.tools_source == "logged" and inv.request.tools[0]["function"]["name"] == "lookup"


def test_forced_format_and_unknown_format_name(tmp_path, collect_config):
    from slmconvert.errors import SlmconvertError

    log = write_jsonl(tmp_path / "ft.jsonl", [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    m, _, _ = collect(collect_config, tmp_path, log, format="trajectory")
    assert m.extra["formats"] == {"trajectory": 1}
    with pytest.raises(SlmconvertError, match=r"Unknown log format: 'nope' \(known: .*request-response"):
        collect(collect_config, tmp_path, log, format="nope", ws=tmp_path / "ws2")


def test_tools_are_inferred_per_call_site_with_required_and_types(tmp_path, collect_config):
    recs = [
        rr_record("q1", call=("book", {"city": "Paris", "nights": 2, "vip": True}), session="1"),
        rr_record("q2", call=("book", {"city": "Rome", "nights": 1.5}), session="2"),
        rr_record("q3", call=("cancel", {"booking": {"id": "B1", "items": [1, 2]}}), session="3"),
    ]
    log = write_jsonl(tmp_path / "gw.jsonl", recs)
    _, invs, ws = collect(collect_config, tmp_path, log)
    inv = next(iter(invs.values()))
    assert inv.request.tools_source == "inferred"
    tools = {t["function"]["name"]: t["function"]["parameters"] for t in inv.request.tools}
    assert set(tools) == {"book", "cancel"}
    assert tools["book"]["required"] == ["city", "nights"]  # 'vip' is not in every call
    assert tools["book"]["properties"]["nights"]["type"] == "number"  # int and float seen
    assert tools["book"]["properties"]["vip"]["type"] == "boolean"
    booking = tools["cancel"]["properties"]["booking"]
    assert booking["properties"]["items"] == {"type": "array", "items": {"type": "integer"}}


def test_tools_file_overrides_inferred_tools(tmp_path, collect_config):
    log = write_jsonl(tmp_path / "gw.jsonl", [rr_record("q", call=("book", {"city": "Oslo"}))])
    tf = tmp_path / "tools.json"
    tf.write_text(json.dumps({"tools": [{"name": "book", "description": "Book a hotel.",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Oslo"]}}}}]}))
    _, invs, _ = collect(collect_config, tmp_path, log, tools_file=str(tf))
    inv = next(iter(invs.values()))
    assert inv.request.tools_source == "file"
    assert inv.request.tools[0]["function"]["description"] == "Book a hotel."


def test_credentials_in_records_are_never_stored(tmp_path, collect_config):
    rec = rr_record("hello", answer="hi", headers={"Authorization": "Bearer sk-live-123"}, api_key="sk-live-456")
    rec["request"]["api_key"] = "sk-live-789"
    log = write_jsonl(tmp_path / "gw.jsonl", [rec])
    m, _, ws = collect(collect_config, tmp_path, log)
    stored = b"".join(p.read_bytes() for p in ws.root.rglob("*") if p.is_file())
    assert b"sk-live" not in stored
    assert m.counts["dropped_secret_fields"] == 2
