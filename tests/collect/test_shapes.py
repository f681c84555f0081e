"""Logs of agents nobody here has seen, in their own layouts, collected with no options."""

import json

from slmconvert.collect.stage import run
from slmconvert.store import load_invocations
from slmconvert.workspace import Workspace
from tests.conftest import write_jsonl

POLICY = ("You are the support agent of a broadband provider. Help the customer fix their connection. "
          "Always check the line status before you suggest a modem restart.")


def collect(collect_config, *paths, **kw):
    cfg = collect_config(*paths, **kw)
    ws = Workspace(cfg.workspace)
    m = run(cfg, ws)
    invs = sorted(load_invocations(ws), key=lambda i: (i.session_id, i.step))
    return m, invs


def _call(name, args, cid):
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def test_message_lists_nested_below_the_top_level(tmp_path, collect_config):
    records = [{"task_id": t, "reward": 1.0, "output": {"history": [
        {"role": "user", "content": f"My line {t} is down."},
        {"role": "assistant", "content": None, "tool_calls": [_call("line_status", {"line": t}, "a")]},
        {"role": "tool", "tool_call_id": "a", "content": '{"status": "down"}'},
        {"role": "assistant", "content": "Your line is down; a technician is on the way."},
    ]}} for t in range(3)]
    m, invs = collect(collect_config, write_jsonl(tmp_path / "runs.jsonl", records))
    assert m.counts["quarantined"] == 0
    assert (m.counts["invocations"], m.counts["sessions"], m.counts["tool_calls"]) == (6, 3, 3)
    assert {i.session_id for i in invs} == {"task_id:0", "task_id:1", "task_id:2"}
    assert invs[0].response.tool_calls[0].name == "line_status" and invs[0].meta["reward"] == 1.0


def test_a_list_of_calls_each_holding_its_own_prompt_is_one_conversation(tmp_path, collect_config):
    opening = [{"role": "system", "content": "You triage tickets."}, {"role": "user", "content": "Printer on fire."}]
    second = opening + [{"role": "assistant", "content": None, "tool_calls": [_call("open_ticket", {"prio": "high"}, "x")]},
                        {"role": "tool", "tool_call_id": "x", "content": "T-1"}]
    record = {"trace_id": "tr-9", "calls": [
        {"input": {"messages": opening}, "output": second[2]},
        {"input": {"messages": second}, "output": {"role": "assistant", "content": "Ticket T-1 is open."}},
    ]}
    m, invs = collect(collect_config, write_jsonl(tmp_path / "calls.jsonl", [record]))
    assert m.counts["quarantined"] == 0 and m.extra["formats"] == {"request-response": 1}  # each {input, output} is one call
    assert [len(i.request.messages) for i in invs] == [2, 4]  # each call's own prompt, not the prefix twice
    assert {i.session_id for i in invs} == {"trace_id:tr-9"}
    assert invs[0].response.tool_calls[0].arguments == {"prio": "high"}
    assert invs[1].response.content == "Ticket T-1 is open." and m.counts["dropped_duplicate"] == 0


def test_a_file_level_object_with_a_policy_and_many_conversations(tmp_path, collect_config):
    tools = [{"type": "function", "function": {"name": "line_status", "parameters": {"type": "object", "properties": {}}}}]
    sims = [{"id": f"sim-{k}", "messages": [
        {"role": "user", "content": f"Hi, it's customer {k}. No internet."},
        {"role": "assistant", "content": "Let me check your line."},
    ]} for k in range(4)]
    f = tmp_path / "results.json"
    f.write_text(json.dumps({"info": {"version": "2"}, "policy": POLICY, "tools": tools, "simulations": sims}))
    m, invs = collect(collect_config, f)
    assert (m.counts["invocations"], m.counts["sessions"], m.counts["quarantined"]) == (4, 4, 0)
    for inv in invs:  # the policy stored once is each conversation's system prompt
        assert inv.request.messages[0] == {"role": "system", "content": POLICY}
        assert inv.request.tools[0]["function"]["name"] == "line_status"
        assert "policy" not in inv.meta
    assert invs[0].source.locator == "line 1 index 0 message 1"  # the index in the log, not after the insert
    assert {i.session_id for i in invs} == {f"id:sim-{k}" for k in range(4)}


def test_a_user_who_makes_tool_calls_is_context_not_an_agent_call(tmp_path, collect_config):
    conv = {"simulation_id": "s1", "messages": [
        {"role": "assistant", "content": "Please turn airplane mode off."},
        {"role": "user", "content": "Done.", "tool_calls": [_call("toggle_airplane_mode", {"on": False}, "u1")]},
        {"role": "tool", "tool_call_id": "u1", "requestor": "user", "content": "Airplane mode is OFF"},
        {"role": "assistant", "content": None, "tool_calls": [_call("check_network", {"phone": "p1"}, "a1")]},
        {"role": "tool", "tool_call_id": "a1", "content": "connected"},
        {"role": "assistant", "content": "You are connected again."},
    ]}
    m, invs = collect(collect_config, write_jsonl(tmp_path / "telecom.jsonl", [conv]))
    assert m.counts["quarantined"] == 0
    assert (m.counts["invocations"], m.counts["tool_calls"]) == (3, 1)
    assert m.extra["tools"] == ["check_network"]  # the user's device action is no agent tool
    assert m.counts["kept_user_side_tool_calls"] == 1
    prompt = invs[1].request.messages
    assert [x["role"] for x in prompt] == ["assistant", "user", "user"]
    assert "toggle_airplane_mode" in prompt[1]["content"] and "Airplane mode is OFF" in prompt[2]["content"]


def test_plain_text_actions_become_tool_calls(tmp_path, collect_config):
    base = "http://10.1.2.3:8080/fhir"
    conv = {"id": "q1", "messages": [
        {"role": "system", "content": "You answer questions with the FHIR server. Act with GET url, POST url {json} or FINISH([answers])."},
        {"role": "user", "content": "What is the MRN of the patient born 1970-01-02?"},
        {"role": "assistant", "content": f"GET {base}/Patient?birthdate=1970-01-02&_count=5"},
        {"role": "user", "content": "Here is the response from the GET request: {\"total\": 1}"},
        {"role": "assistant", "content": f"I will record the vitals.\nPOST {base}/Observation {{\"status\": \"final\", \"value\": 98.6}}"},
        {"role": "user", "content": "POST request accepted"},
        {"role": "assistant", "content": 'FINISH(["S6541353"])'},
    ]}
    m, invs = collect(collect_config, write_jsonl(tmp_path / "agent.jsonl", [conv]))
    assert (m.counts["invocations"], m.counts["tool_calls"], m.counts["text"]) == (3, 3, 0)
    get, post, finish = (i.response.tool_calls[0] for i in invs)
    assert (get.name, get.arguments) == ("GET", {"url": f"{base}/Patient", "query": {"birthdate": "1970-01-02", "_count": "5"}})
    assert post.name == "POST" and post.arguments == {"url": f"{base}/Observation", "body": {"status": "final", "value": 98.6}}
    assert invs[1].response.content == "I will record the vitals."  # the thought before the action stays
    assert (finish.name, finish.arguments) == ("FINISH", {"args": ["S6541353"]})
    # the history shows earlier actions the same way the answers are stored
    assert invs[2].request.messages[2]["tool_calls"][0]["function"]["name"] == "GET"
    assert m.extra["text_actions"] == {"call": {"FINISH": 1}, "http": {"GET": 1, "POST": 1}}
    # what `serve` sends back to this agent: the SLM's tool call written as the agent's own text
    from slmconvert.collect.textactions import as_text, load_rules

    rules = load_rules(["http", "call"])
    texts = [as_text(i.response.content, [(c.name, c.arguments) for c in i.response.tool_calls], rules, m.extra["text_actions"])
             for i in invs]
    assert texts == [conv["messages"][k]["content"] for k in (2, 4, 6)]
    assert as_text(None, [("DELETE", {"url": "x"})], rules, m.extra["text_actions"]) is None  # never seen: no text form


def test_declared_text_action_and_switching_the_built_ins_off(tmp_path, collect_config):
    conv = {"id": "r", "messages": [
        {"role": "user", "content": "weather in Oslo?"},
        {"role": "assistant", "content": "Thought: look it up.\nAction: weather[city=Oslo]"},
        {"role": "user", "content": "Observation: 3C"},
        {"role": "assistant", "content": "FINISH(\"3C\")"},
    ]}
    log = write_jsonl(tmp_path / "react.jsonl", [conv])
    rule = {"name": "react", "pattern": r"Action: (?P<tool>\w+)\[(?P<args>[^\]]*)\]", "arguments": "query",
            "render": "Action: {tool}[city={city}]"}
    m, invs = collect(collect_config, log, text_actions=[rule], ws=tmp_path / "ws1")
    assert invs[0].response.tool_calls[0].name == "weather" and invs[0].response.tool_calls[0].arguments == {"city": "Oslo"}
    assert invs[1].response.tool_calls == []  # the built-in 'call' shape is not on: only the declared rule
    m, invs = collect(collect_config, log, text_actions=[], ws=tmp_path / "ws2")
    assert m.counts["tool_calls"] == 0


def test_client_ids_never_name_the_agent_and_keep_users_apart(tmp_path, collect_config):
    records = []
    for u in range(45):
        records.append({"client_id": f"user-{u}", "request": {"messages": [
            {"role": "system", "content": "You are a concierge."}, {"role": "user", "content": "hi"}]},
            "response": {"choices": [{"message": {"role": "assistant", "content": "Hello! How can I help?"}}]}})
    m, invs = collect(collect_config, write_jsonl(tmp_path / "gw.jsonl", records))
    assert m.counts["invocations"] == 45 and m.counts["sessions"] == 45
    assert m.counts.get("dropped_duplicate", 0) == 0
    assert {i.agent for i in invs} == {None}
    assert {i.meta["client_id"] for i in invs} == {f"user-{u}" for u in range(45)}


def test_messages_path_override_and_its_error(tmp_path, collect_config):
    rec = {"id": 1, "a": {"b": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
           "c": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "q"}]}
    log = write_jsonl(tmp_path / "two.jsonl", [rec])
    m, invs = collect(collect_config, log, messages_path="a.b", format="trajectory", ws=tmp_path / "w1")
    assert [i.response.content for i in invs] == ["y"]
    m, _ = collect(collect_config, log, messages_path="a.nope", format="trajectory", ws=tmp_path / "w2")
    assert m.counts["quarantined"] == 1


def test_a_gateway_record_of_a_text_agent_gets_its_history_and_answer_read_alike(tmp_path, collect_config):
    rec = {"session_id": "g1", "request": {"messages": [
        {"role": "user", "content": "Which patient was born 1970-01-02?"},
        {"role": "assistant", "content": "GET http://fhir.local/Patient?birthdate=1970-01-02"},
        {"role": "user", "content": "{\"total\": 1}"}]},
        "response": {"choices": [{"message": {"role": "assistant", "content": 'FINISH(["S1"])'}, "finish_reason": "stop"}]}}
    m, [inv] = collect(collect_config, write_jsonl(tmp_path / "gw.jsonl", [rec]))
    assert inv.response.tool_calls[0].name == "FINISH" and inv.response.finish_reason == "tool_calls"
    assert inv.request.messages[1]["tool_calls"][0]["function"]["name"] == "GET"  # the history as the answer is stored
    assert m.extra["text_actions"] == {"call": {"FINISH": 1}, "http": {"GET": 1}}


def test_bad_text_action_rules_are_reported_together_with_their_key_paths(tmp_path, collect_config):
    import pytest

    from slmconvert.errors import ConfigError
    from slmconvert.validation import preflight

    log = write_jsonl(tmp_path / "a.jsonl", [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}])
    cfg = collect_config(log, text_actions=[{"pattern": "(", "tool": "x"}, "nope", {"pattern": "A (?P<args>.*)"}])
    with pytest.raises(ConfigError) as e:
        run(cfg, Workspace(cfg.workspace))
    assert [p.split(":")[0] for p in e.value.problems] == [
        "collect.text_actions[0].pattern", "collect.text_actions[1]", "collect.text_actions[2]"]
    assert not (tmp_path / "ws" / "invocations" / "manifest.json").exists()  # nothing half-done
    assert sum(p.startswith("collect.text_actions") for p in preflight(cfg, {"collect"})) == 3
