"""The logs teams already have: tracing and gateway exports, and the Anthropic / Responses dialects.

Every sample below is one conversation of a small rail-support agent, written by hand in the shape
each tool's public documentation gives: the user asks for a refund, the agent looks the booking up
(a tool call), reads the result and answers. Each reader must give the same two calls, with the same
prompts, tool definitions and answers, as the chat-completions log of that conversation.
"""

from __future__ import annotations

import json
import shutil

import pytest

from slmconvert.collect.stage import run
from slmconvert.store import load_invocations
from slmconvert.workspace import Workspace
from tests.conftest import write_jsonl

SYSTEM = "You are the Acme Rail support agent. Look bookings up before answering."
USER = "Can I get a refund for booking BK-1042?"
RESULT = '{"status": "cancelled", "paid": 42.5}'
ANSWER = "Booking BK-1042 was cancelled, so the 42.50 you paid will be refunded."
PARAMS = {"type": "object", "properties": {"booking_id": {"type": "string"}}, "required": ["booking_id"]}
DESC = "Look up a booking by its id."
ARGS = {"booking_id": "BK-1042"}
CHAT_TOOLS = [{"type": "function", "function": {"name": "get_booking", "description": DESC, "parameters": PARAMS}}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_booking", "arguments": json.dumps(ARGS)}}
TURN1 = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
TURN2 = TURN1 + [{"role": "assistant", "content": None, "tool_calls": [CALL]},
                 {"role": "tool", "tool_call_id": "call_1", "content": RESULT}]


def chat_log() -> list[dict]:
    """The reference: OpenAI chat completions, one request/response pair per call."""
    return [
        {"conversation_id": "c-7", "timestamp": "2026-03-01T10:00:00Z",
         "request": {"model": "gpt-4o", "messages": TURN1, "tools": CHAT_TOOLS},
         "response": {"choices": [{"message": {"role": "assistant", "content": None, "tool_calls": [CALL]}, "finish_reason": "tool_calls"}],
                      "usage": {"prompt_tokens": 120, "completion_tokens": 18}}},
        {"conversation_id": "c-7", "timestamp": "2026-03-01T10:00:03Z",
         "request": {"model": "gpt-4o", "messages": TURN2, "tools": CHAT_TOOLS},
         "response": {"choices": [{"message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}],
                      "usage": {"prompt_tokens": 160, "completion_tokens": 21}}},
    ]


def collect(collect_config, tmp_path, *paths, name="ws"):
    cfg = collect_config(*paths, ws=tmp_path / name)
    ws = Workspace(cfg.workspace)
    m = run(cfg, ws)
    invs = sorted(load_invocations(ws), key=lambda i: (i.session_id, i.step))
    quarantine = [json.loads(x) for x in (ws.stage_dir("collect") / "quarantine.jsonl").read_text().splitlines()]
    return m, invs, quarantine


def content(inv) -> tuple:
    return (json.dumps(inv.request.messages, sort_keys=True), json.dumps(inv.request.tools, sort_keys=True),
            inv.response.content, [(c.name, c.arguments) for c in inv.response.tool_calls])


def reference(collect_config, tmp_path) -> list[tuple]:
    _, invs, _ = collect(collect_config, tmp_path, write_jsonl(tmp_path / "ref" / "chat.jsonl", chat_log()), name="ref-ws")
    return [content(i) for i in invs]


def check_conversation(invs, ref, usage=((120, 18), (160, 21))):
    """Two calls of one session: the lookup, then the answer; same prompts, tools and answers as chat completions."""
    assert len(invs) == 2 and len({i.session_id for i in invs}) == 1
    first, second = invs
    assert [(c.name, c.arguments) for c in first.response.tool_calls] == [("get_booking", ARGS)]
    assert first.response.finish_reason == "tool_calls"
    assert second.response.content == ANSWER and not second.response.tool_calls
    assert [t["function"]["name"] for t in first.request.tools] == ["get_booking"]
    assert first.request.tools[0]["function"]["parameters"] == PARAMS
    assert second.request.messages[-1] == {"role": "tool", "tool_call_id": "call_1", "name": "get_booking", "content": RESULT}
    if usage:
        assert [(i.usage.prompt_tokens, i.usage.completion_tokens) for i in invs] == list(usage)
    assert [content(i) for i in invs] == ref


# --------------------------------------------------------------------------- request/response dialects


def test_anthropic_messages_bodies(tmp_path, collect_config):
    tools = [{"name": "get_booking", "description": DESC, "input_schema": PARAMS},
             {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]  # a server tool: not the agent's
    use = {"type": "tool_use", "id": "call_1", "name": "get_booking", "input": ARGS}
    log = [
        {"conversation_id": "c-7", "request": {"model": "claude-sonnet-4-5", "max_tokens": 1024, "system": [{"type": "text", "text": SYSTEM}],
                                               "tools": tools, "messages": [{"role": "user", "content": USER}]},
         "response": {"id": "msg_01", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
                      "content": [{"type": "thinking", "thinking": "I should look it up.", "signature": "x"}, use],
                      "stop_reason": "tool_use", "usage": {"input_tokens": 120, "output_tokens": 18}}},
        {"conversation_id": "c-7", "request": {"model": "claude-sonnet-4-5", "max_tokens": 1024, "system": SYSTEM, "tools": tools,
                                               "messages": [{"role": "user", "content": [{"type": "text", "text": USER}]},
                                                            {"role": "assistant", "content": [use]},
                                                            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1",
                                                                                          "content": [{"type": "text", "text": RESULT}]}]}]},
         "response": {"id": "msg_02", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
                      "content": [{"type": "text", "text": ANSWER}], "stop_reason": "end_turn",
                      "usage": {"input_tokens": 160, "output_tokens": 21}}},
    ]
    m, invs, q = collect(collect_config, tmp_path, write_jsonl(tmp_path / "anthropic.jsonl", log))
    assert m.extra["formats"] == {"request-response": 1} and q == []
    check_conversation(invs, reference(collect_config, tmp_path))
    assert invs[1].response.finish_reason == "stop" and invs[0].model == "claude-sonnet-4-5"
    assert m.counts["dropped_builtin_tools"] == 2  # web_search left out of both calls' tools


def test_openai_responses_bodies_as_json_strings(tmp_path, collect_config):
    tools = [{"type": "function", "name": "get_booking", "description": DESC, "parameters": PARAMS, "strict": False},
             {"type": "web_search_preview"}]
    fc = {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_booking", "arguments": json.dumps(ARGS), "status": "completed"}
    log = [
        {"conversation_id": "c-7", "request_body": json.dumps({"model": "gpt-4.1", "instructions": SYSTEM, "tools": tools,
                                                               "input": [{"role": "user", "content": [{"type": "input_text", "text": USER}]}]}),
         "response_body": json.dumps({"id": "resp_1", "object": "response", "status": "completed", "model": "gpt-4.1",
                                      "output": [{"type": "reasoning", "id": "rs_1", "summary": []}, fc],
                                      "usage": {"input_tokens": 120, "output_tokens": 18}})},
        {"conversation_id": "c-7", "request_body": json.dumps({"model": "gpt-4.1", "instructions": SYSTEM, "tools": tools, "input": [
            {"type": "message", "role": "user", "content": USER}, fc,
            {"type": "function_call_output", "call_id": "call_1", "output": RESULT}]}),
         "response_body": json.dumps({"id": "resp_2", "object": "response", "status": "completed", "model": "gpt-4.1",
                                      "output": [{"type": "message", "id": "msg_2", "role": "assistant", "status": "completed",
                                                  "content": [{"type": "output_text", "text": ANSWER, "annotations": []}]}],
                                      "usage": {"input_tokens": 160, "output_tokens": 21}})},
    ]
    m, invs, q = collect(collect_config, tmp_path, write_jsonl(tmp_path / "responses.jsonl", log))
    assert m.extra["formats"] == {"request-response": 1} and q == []
    check_conversation(invs, reference(collect_config, tmp_path))
    assert invs[0].model == "gpt-4.1"


def test_a_failed_or_incomplete_responses_call(tmp_path, collect_config):
    body = json.dumps({"model": "gpt-4.1", "input": USER})
    log = [{"request_body": body, "response_body": json.dumps({"object": "response", "status": "failed", "output": [],
                                                               "error": {"code": "server_error", "message": "overloaded"}})},
           {"request_body": body, "response_body": json.dumps({"object": "response", "status": "incomplete",
                                                               "output": [{"type": "message", "role": "assistant",
                                                                           "content": [{"type": "output_text", "text": "Booking BK-"}]}]})}]
    m, invs, q = collect(collect_config, tmp_path, write_jsonl(tmp_path / "r.jsonl", log))
    assert [(e["locator"], e["code"]) for e in q] == [("line 1", "failed_call")] and "overloaded" in q[0]["reason"]
    assert len(invs) == 1 and invs[0].response.finish_reason == "length"


# --------------------------------------------------------------------------- OpenTelemetry


def _a(key, value):
    if isinstance(value, int) and not isinstance(value, bool):
        return {"key": key, "value": {"intValue": str(value)}}
    return {"key": key, "value": {"stringValue": value if isinstance(value, str) else json.dumps(value)}}


def _span(span_id, name, attrs, start, status=None, parent="a1"):
    return {"traceId": "5b8efff798038103d269b633813fc60c", "spanId": span_id, "parentSpanId": parent, "name": name, "kind": 3,
            "startTimeUnixNano": str(start * 10**9), "endTimeUnixNano": str(start * 10**9 + 850_000_000),
            "attributes": [_a(k, v) for k, v in attrs.items()], "status": status or {}}


def test_otel_genai_semantic_conventions_otlp_json(tmp_path, collect_config):
    common = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o",
              "gen_ai.conversation.id": "c-7", "gen_ai.system_instructions": [{"type": "text", "content": SYSTEM}],
              "gen_ai.tool.definitions": [{"type": "function", "name": "get_booking", "description": DESC, "parameters": PARAMS}]}
    user = {"role": "user", "parts": [{"type": "text", "content": USER}]}
    call = {"role": "assistant", "parts": [{"type": "tool_call", "id": "call_1", "name": "get_booking", "arguments": ARGS}]}
    spans = [
        _span("a1", "invoke_agent rail", {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "rail"}, 1772359200, parent=""),
        _span("b1", "chat gpt-4o", {**common, "gen_ai.input.messages": [user], "gen_ai.output.messages": [{**call, "finish_reason": "tool_call"}],
                                    "gen_ai.usage.input_tokens": 120, "gen_ai.usage.output_tokens": 18}, 1772359201),
        _span("c1", "execute_tool get_booking", {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "get_booking"}, 1772359202),
        _span("d1", "chat gpt-4o", {**common, "gen_ai.input.messages": [
            user, call, {"role": "tool", "parts": [{"type": "tool_call_response", "id": "call_1", "response": RESULT}]}],
            "gen_ai.output.messages": [{"role": "assistant", "parts": [{"type": "text", "content": ANSWER}], "finish_reason": "stop"}],
            "gen_ai.usage.input_tokens": 160, "gen_ai.usage.output_tokens": 21}, 1772359203),
        _span("e1", "chat gpt-4o", {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o"}, 1772359204),  # content not captured
        _span("f1", "chat gpt-4o", {**common, "gen_ai.input.messages": [user]}, 1772359205,
              status={"code": 2, "message": "429 Too Many Requests"}),
    ]
    export = {"resourceSpans": [{"resource": {"attributes": [_a("service.name", "rail-agent")]},
                                 "scopeSpans": [{"scope": {"name": "opentelemetry.instrumentation.openai_v2"}, "spans": spans}]}]}
    path = tmp_path / "traces.json"
    path.write_text(json.dumps(export, indent=2))  # pretty-printed: one JSON document
    m, invs, q = collect(collect_config, tmp_path, path)
    assert m.extra["formats"] == {"otel": 1}
    check_conversation(invs, reference(collect_config, tmp_path))
    assert invs[0].session_id == "conversation_id:c-7" and invs[0].latency_ms == 850.0
    assert invs[0].timestamp == "2026-03-01T10:00:01Z" and invs[0].meta["service"] == "rail-agent"
    assert m.counts["dropped_non_llm_spans"] == 2
    by_code = {e["code"]: e for e in q}
    assert set(by_code) == {"no_content", "failed_call"}
    assert by_code["no_content"]["locator"] == "document resourceSpans[0].scopeSpans[0].spans[4]"
    assert "CAPTURE_MESSAGE_CONTENT" in by_code["no_content"]["reason"] and "429" in by_code["failed_call"]["reason"]


def test_otel_indexed_attributes_openllmetry_jsonl(tmp_path, collect_config):
    """OpenLLMetry's gen_ai.prompt.N / gen_ai.completion.N / llm.request.functions.N, spans as an SDK writes them."""
    def span(k, prompt, completion, usage):
        attrs = {"llm.request.type": "chat", "gen_ai.system": "OpenAI", "gen_ai.request.model": "gpt-4o",
                 "llm.request.functions.0.name": "get_booking", "llm.request.functions.0.description": DESC,
                 "llm.request.functions.0.parameters": json.dumps(PARAMS),
                 "gen_ai.usage.prompt_tokens": usage[0], "gen_ai.usage.completion_tokens": usage[1]}
        for i, msg in enumerate(prompt):
            attrs.update({f"gen_ai.prompt.{i}.{f}": v for f, v in msg.items()})
        attrs.update({f"gen_ai.completion.0.{f}": v for f, v in completion.items()})
        return {"name": "openai.chat", "context": {"trace_id": "0x5b8efff798038103d269b633813fc60c", "span_id": f"0x00000000000000{k}1"},
                "kind": "SpanKind.CLIENT", "parent_id": None, "start_time": f"2026-03-01T10:00:0{k}.000000Z",
                "end_time": f"2026-03-01T10:00:0{k}.500000Z", "status": {"status_code": "UNSET"}, "attributes": attrs,
                "resource": {"attributes": {"service.name": "rail-agent"}}}
    call = {"role": "assistant", "tool_calls.0.id": "call_1", "tool_calls.0.name": "get_booking", "tool_calls.0.arguments": json.dumps(ARGS)}
    prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
    lines = [span(1, prompt, {**call, "finish_reason": "tool_calls"}, (120, 18)),
             span(3, prompt + [call, {"role": "tool", "tool_call_id": "call_1", "content": RESULT}],
                  {"role": "assistant", "content": ANSWER, "finish_reason": "stop"}, (160, 21))]
    m, invs, q = collect(collect_config, tmp_path, write_jsonl(tmp_path / "spans.jsonl", lines))
    assert m.extra["formats"] == {"otel": 1} and q == []
    check_conversation(invs, reference(collect_config, tmp_path))
    assert invs[0].session_id == "trace_id:0x5b8efff798038103d269b633813fc60c" and invs[0].latency_ms == 500.0


def test_otel_openinference_spans_in_a_json_array(tmp_path, collect_config):
    """OpenInference (Phoenix, Arize): llm.input_messages.N.message.*, llm.tools.N.tool.json_schema, session.id."""
    def msg(prefix, i, m):
        out = {f"{prefix}.{i}.message.role": m["role"]}
        if m.get("content") is not None:
            out[f"{prefix}.{i}.message.contents.0.message_content.type"] = "text"
            out[f"{prefix}.{i}.message.contents.0.message_content.text"] = m["content"]
        for j, c in enumerate(m.get("tool_calls") or []):
            out[f"{prefix}.{i}.message.tool_calls.{j}.tool_call.id"] = c["id"]
            out[f"{prefix}.{i}.message.tool_calls.{j}.tool_call.function.name"] = c["function"]["name"]
            out[f"{prefix}.{i}.message.tool_calls.{j}.tool_call.function.arguments"] = c["function"]["arguments"]
        if m.get("tool_call_id"):
            out[f"{prefix}.{i}.message.tool_call_id"] = m["tool_call_id"]
        return out

    def llm_span(span_id, prompt, answer, usage, start):
        attrs = {"openinference.span.kind": "LLM", "llm.model_name": "gpt-4o", "session.id": "c-7",
                 "llm.invocation_parameters": json.dumps({"temperature": 0}),
                 "llm.tools.0.tool.json_schema": json.dumps(CHAT_TOOLS[0]),
                 "llm.token_count.prompt": usage[0], "llm.token_count.completion": usage[1]}
        for i, m in enumerate(prompt):
            attrs.update(msg("llm.input_messages", i, m))
        attrs.update(msg("llm.output_messages", 0, answer))
        return _span(span_id, "ChatCompletion", attrs, start)

    spans = [_span("a1", "agent", {"openinference.span.kind": "CHAIN", "input.value": USER}, 1772359200, parent=""),
             llm_span("b1", TURN1, {"role": "assistant", "tool_calls": [CALL]}, (120, 18), 1772359201),
             llm_span("c1", TURN2, {"role": "assistant", "content": ANSWER}, (160, 21), 1772359203)]
    path = tmp_path / "phoenix.json"
    path.write_text(json.dumps(spans))
    m, invs, q = collect(collect_config, tmp_path, path)
    assert m.extra["formats"] == {"otel": 1} and q == [] and m.counts["dropped_non_llm_spans"] == 1
    check_conversation(invs, reference(collect_config, tmp_path))
    assert invs[0].session_id == "session_id:c-7" and invs[0].request.params == {"temperature": 0}


# --------------------------------------------------------------------------- Langfuse, LiteLLM, LangSmith


def test_langfuse_trace_with_its_observations(tmp_path, collect_config):
    def gen(i, messages, output, usage, level="DEFAULT"):
        return {"id": f"obs-{i}", "traceId": "tr-1", "type": "GENERATION", "name": "ChatOpenAI", "level": level,
                "startTime": f"2026-03-01T10:00:0{i}.000Z", "endTime": f"2026-03-01T10:00:0{i}.750Z", "model": "gpt-4o",
                "modelParameters": {"temperature": 0}, "input": {"messages": messages, "tools": CHAT_TOOLS}, "output": output,
                "usageDetails": {"input": usage[0], "output": usage[1], "total": sum(usage)},
                "costDetails": {"total": 0.0004}, "statusMessage": "upstream timeout" if level == "ERROR" else None}
    trace = {"id": "tr-1", "name": "rail-agent", "sessionId": "c-7", "timestamp": "2026-03-01T10:00:00.000Z", "observations": [
        {"id": "obs-0", "traceId": "tr-1", "type": "SPAN", "name": "agent", "startTime": "2026-03-01T10:00:00.000Z"},
        gen(1, TURN1, {"role": "assistant", "content": None, "tool_calls": [CALL]}, (120, 18)),
        gen(3, TURN2, {"role": "assistant", "content": ANSWER}, (160, 21)),
        gen(5, TURN1, None, (120, 0), level="ERROR"),
    ]}
    path = tmp_path / "langfuse-trace.json"
    path.write_text(json.dumps(trace, indent=2))
    m, invs, q = collect(collect_config, tmp_path, path)
    assert m.extra["formats"] == {"langfuse": 1} and m.counts["dropped_non_generation_observations"] == 1
    check_conversation(invs, reference(collect_config, tmp_path))
    assert invs[0].session_id == "session_id:c-7" and invs[0].latency_ms == 750.0 and invs[0].cost_usd == 0.0004
    assert [(e["locator"], e["code"]) for e in q] == [("document observations[3]", "failed_call")]
    assert "upstream timeout" in q[0]["reason"]


def test_litellm_standard_logging_payload(tmp_path, collect_config):
    def payload(k, messages, response, usage, status="success"):
        return {"id": f"chatcmpl-{k}", "trace_id": "c-7", "call_type": "acompletion", "stream": False, "status": status,
                "response_cost": 0.0003, "prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage),
                "startTime": 1772359200.0 + k, "endTime": 1772359200.5 + k, "model": "gpt-4o", "model_group": "gpt-4o",
                "metadata": {"user_api_key_hash": "88dc28d0f030c55ed4ab77ed8faf098196cb1c05df778539800c9f1243fe6b4b",
                             "user_api_key_alias": "rail-prod"},
                "messages": messages, "response": response, "model_parameters": {"temperature": 0, "tools": CHAT_TOOLS},
                "error_str": "RateLimitError: slow down" if status == "failure" else None}
    log = [payload(1, TURN1, {"id": "x", "choices": [{"message": {"role": "assistant", "content": None, "tool_calls": [CALL]},
                                                      "finish_reason": "tool_calls"}], "model": "gpt-4o"}, (120, 18)),
           payload(2, TURN1, "", (120, 0), status="failure"),
           payload(3, TURN2, {"id": "y", "choices": [{"message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}]},
                   (160, 21))]
    m, invs, q = collect(collect_config, tmp_path, write_jsonl(tmp_path / "litellm.jsonl", log))
    assert m.extra["formats"] == {"litellm": 1}
    check_conversation(invs, reference(collect_config, tmp_path))
    assert [(e["locator"], e["code"]) for e in q] == [("line 2", "failed_call")] and "RateLimitError" in q[0]["reason"]
    assert invs[0].session_id == "trace_id:c-7" and invs[0].cost_usd == 0.0003 and invs[0].latency_ms == 500.0
    stored = json.dumps([i.meta for i in invs])
    assert "user_api_key" not in stored and "rail-prod" not in stored  # gateway credentials never stored


def _lc(cls, **kwargs):
    return {"lc": 1, "type": "constructor", "id": ["langchain", "schema", "messages", cls], "kwargs": kwargs}


def test_langsmith_runs_langchain_serialised(tmp_path, collect_config):
    prompt1 = [_lc("SystemMessage", content=SYSTEM, type="system"), _lc("HumanMessage", content=USER, type="human")]
    ai_call = _lc("AIMessage", content="", type="ai", tool_calls=[{"name": "get_booking", "args": ARGS, "id": "call_1", "type": "tool_call"}],
                  response_metadata={"finish_reason": "tool_calls"})
    prompt2 = prompt1 + [ai_call, _lc("ToolMessage", content=RESULT, type="tool", tool_call_id="call_1")]

    def run_(k, prompt, answer, usage):
        return {"id": f"run-{k}", "trace_id": "tr-1", "parent_run_id": "run-0", "name": "ChatOpenAI", "run_type": "llm",
                "start_time": f"2026-03-01T10:00:0{k}.000000", "end_time": f"2026-03-01T10:00:0{k}.250000",
                "inputs": {"messages": [prompt]},
                "outputs": {"generations": [[{"text": "", "message": answer, "type": "ChatGeneration"}]],
                            "llm_output": {"token_usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1]}}},
                "extra": {"invocation_params": {"model": "gpt-4o", "temperature": 0, "tools": CHAT_TOOLS},
                          "metadata": {"thread_id": "c-7", "ls_provider": "openai"}},
                "error": None, "session_id": "8a1f-project-id"}
    runs = [{"id": "run-0", "trace_id": "tr-1", "name": "AgentExecutor", "run_type": "chain", "inputs": {"input": USER}, "outputs": {}},
            run_(1, prompt1, ai_call, (120, 18)),
            run_(3, prompt2, _lc("AIMessage", content=ANSWER, type="ai", response_metadata={"finish_reason": "stop"}), (160, 21))]
    m, invs, q = collect(collect_config, tmp_path, write_jsonl(tmp_path / "runs.jsonl", runs))
    assert m.extra["formats"] == {"langsmith": 1} and q == [] and m.counts["dropped_non_llm_runs"] == 1
    check_conversation(invs, reference(collect_config, tmp_path))
    assert invs[0].session_id == "thread_id:c-7"  # the thread, never the tracing project's session_id
    assert invs[0].latency_ms == 250.0


def test_langsmith_runs_of_a_wrapped_openai_client(tmp_path, collect_config):
    def run_(k, messages, message, usage):
        return {"id": f"run-{k}", "trace_id": "tr-1", "name": "ChatOpenAI", "run_type": "llm",
                "inputs": {"messages": messages, "model": "gpt-4o", "tools": CHAT_TOOLS},
                "outputs": {"id": "chatcmpl", "object": "chat.completion", "model": "gpt-4o",
                            "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if message.get("tool_calls") else "stop"}],
                            "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1]}}}
    runs = [run_(1, TURN1, {"role": "assistant", "content": None, "tool_calls": [CALL]}, (120, 18)),
            run_(2, TURN2, {"role": "assistant", "content": ANSWER}, (160, 21))]
    m, invs, q = collect(collect_config, tmp_path, write_jsonl(tmp_path / "runs.jsonl", runs))
    assert m.extra["formats"] == {"langsmith": 1} and q == []
    check_conversation(invs, reference(collect_config, tmp_path))
    assert invs[0].session_id == "trace_id:tr-1"


# --------------------------------------------------------------------------- OpenAI Batch


def _batch_files(folder):
    folder.mkdir(parents=True, exist_ok=True)
    requests = [{"custom_id": f"req-{k}", "method": "POST", "url": "/v1/chat/completions",
                 "body": {"model": "gpt-4o", "messages": msgs, "tools": CHAT_TOOLS}} for k, msgs in ((1, TURN1), (2, TURN2), (3, TURN1))]
    outputs = [
        {"id": "batch_req_2", "custom_id": "req-2", "response": {"status_code": 200, "request_id": "r2", "body": {
            "choices": [{"message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 160, "completion_tokens": 21}}}, "error": None},
        {"id": "batch_req_1", "custom_id": "req-1", "response": {"status_code": 200, "request_id": "r1", "body": {
            "choices": [{"message": {"role": "assistant", "content": None, "tool_calls": [CALL]}, "finish_reason": "tool_calls"}],
            "usage": {"prompt_tokens": 120, "completion_tokens": 18}}}, "error": None},
        {"id": "batch_req_3", "custom_id": "req-3", "response": None,
         "error": {"code": "batch_expired", "message": "This request could not be executed before the completion window expired."}},
        {"id": "batch_req_9", "custom_id": "req-9", "response": {"status_code": 200, "body": {
            "choices": [{"message": {"role": "assistant", "content": "?"}, "finish_reason": "stop"}]}}, "error": None},
    ]
    return write_jsonl(folder / "batch_input.jsonl", requests), write_jsonl(folder / "batch_6721_output.jsonl", outputs)


def test_openai_batch_output_joined_with_its_input(tmp_path, collect_config):
    inp, out = _batch_files(tmp_path / "batch")
    m, invs, q = collect(collect_config, tmp_path, out, inp)  # output first: answers wait for their requests
    assert m.extra["formats"] == {"openai-batch": 2}
    by_cid = {i.meta["custom_id"]: i for i in invs}
    assert set(by_cid) == {"req-1", "req-2"}
    assert [(c.name, c.arguments) for c in by_cid["req-1"].response.tool_calls] == [("get_booking", ARGS)]
    assert by_cid["req-2"].response.content == ANSWER and by_cid["req-2"].usage.prompt_tokens == 160
    assert by_cid["req-1"].source.path.endswith("batch_6721_output.jsonl") and by_cid["req-1"].source.locator == "line 2"
    assert {(e["locator"], e["code"]) for e in q} == {("line 3", "failed_call"), ("line 4", "missing_request")}
    assert "completion window" in next(e["reason"] for e in q if e["code"] == "failed_call")


def test_openai_batch_output_alone_finds_its_input_beside_it(tmp_path, collect_config):
    inp, out = _batch_files(tmp_path / "batch")
    m, invs, q = collect(collect_config, tmp_path, out)  # the input file is not listed, but sits beside the output
    assert {i.meta["custom_id"] for i in invs} == {"req-1", "req-2"}
    assert {e["code"] for e in q} == {"failed_call", "missing_request"}
    inp.unlink()
    m, invs, q = collect(collect_config, tmp_path, out, name="ws2")
    assert invs == [] and sorted(e["code"] for e in q) == ["failed_call", "missing_request", "missing_request", "missing_request"]
    assert "input file" in next(e["reason"] for e in q if e["code"] == "missing_request")


# --------------------------------------------------------------------------- mixed


def test_nemo_agent_toolkit_roles(tmp_path, collect_config):
    conv = {"session_id": "c-7", "messages": [{"role": "system", "content": SYSTEM}, {"role": "human", "content": USER},
                                              {"role": "chain", "content": RESULT}, {"role": "ai", "content": ANSWER}]}
    m, invs, q = collect(collect_config, tmp_path, write_jsonl(tmp_path / "nat.jsonl", [conv]))
    assert q == [] and len(invs) == 1
    assert [x["role"] for x in invs[0].request.messages] == ["system", "user", "tool"] and invs[0].response.content == ANSWER


@pytest.mark.parametrize("fmt", ["anthropic", "responses", "otel", "langfuse", "litellm", "langsmith"])
def test_the_demo_agent_logged_by_another_tool_gives_the_same_calls(tmp_path, collect_config, fmt):
    from slmconvert.demo import generate

    generate(tmp_path / "chat.jsonl", sessions=12, seed=3)
    generate(tmp_path / f"{fmt}.jsonl", sessions=12, seed=3, fmt=fmt)
    m_ref, ref, _ = collect(collect_config, tmp_path, tmp_path / "chat.jsonl", name="ref")
    m, invs, q = collect(collect_config, tmp_path, tmp_path / f"{fmt}.jsonl")
    assert q == [] and m.counts["invocations"] == m_ref.counts["invocations"] and m.counts["sessions"] == m_ref.counts["sessions"]
    assert sorted(map(content, invs)) == sorted(map(content, ref))
    usage = lambda xs: sorted((i.usage.prompt_tokens, i.usage.completion_tokens, i.timestamp) for i in xs)  # noqa: E731
    assert usage(invs) == usage(ref)


def test_a_folder_of_mixed_exports(tmp_path, collect_config):
    """One folder, one file per tool: each file detected on its own, every call read once."""
    from slmconvert.demo import generate

    folder = tmp_path / "logs"
    for k, fmt in enumerate(["request-response", "otel", "langfuse", "litellm", "langsmith", "responses"]):
        generate(folder / f"{fmt}.jsonl", sessions=6, seed=10 + k, fmt=fmt)
    _batch_files(folder / "batches")
    shutil.copy(tmp_path / "logs" / "otel.jsonl", tmp_path / "otel-copy.jsonl")
    m, invs, q = collect(collect_config, tmp_path, folder, tmp_path / "otel-copy.jsonl")
    assert m.extra["formats"] == {"request-response": 2, "otel": 2, "langfuse": 1, "litellm": 1, "langsmith": 1, "openai-batch": 2}
    per_file = {}
    for i in invs:
        per_file[i.source.path.rsplit("/", 1)[-1]] = per_file.get(i.source.path.rsplit("/", 1)[-1], 0) + 1
    assert per_file["batch_6721_output.jsonl"] == 2 and m.counts["dropped_duplicate"] == per_file["otel.jsonl"]
    assert {e["code"] for e in q} == {"failed_call", "missing_request"}


def test_a_reader_bug_costs_one_record_not_the_run(tmp_path, collect_config, monkeypatch):
    from slmconvert.collect.observability import LiteLLMFormat

    real = LiteLLMFormat.parse

    def flaky(self, record, ctx):
        if record.get("id") == "boom":
            raise TypeError("'NoneType' object is not subscriptable")
        return real(self, record, ctx)

    monkeypatch.setattr(LiteLLMFormat, "parse", flaky)
    rec = {"id": "ok", "call_type": "completion", "status": "success", "messages": TURN1,
           "response": {"choices": [{"message": {"role": "assistant", "content": "hi"}}]}}
    m, invs, q = collect(collect_config, tmp_path, write_jsonl(tmp_path / "l.jsonl", [rec, {**rec, "id": "boom"}]))
    assert len(invs) == 1 and [(e["locator"], e["code"]) for e in q] == [("line 2", "reader_error")]
    assert "litellm reader" in q[0]["reason"] and "report" in q[0]["reason"]


def test_a_langchain_chat_history_as_trajectory(tmp_path, collect_config):
    """`messages_to_dict` output (what LangChain chat-history stores keep): {"type": "ai", "data": {...}}."""
    history = [{"type": "system", "data": {"content": SYSTEM}}, {"type": "human", "data": {"content": USER}},
               {"type": "ai", "data": {"content": "", "tool_calls": [{"name": "get_booking", "args": ARGS, "id": "call_1"}]}},
               {"type": "tool", "data": {"content": RESULT, "tool_call_id": "call_1"}},
               {"type": "ai", "data": {"content": ANSWER}}]
    record = {"session_id": "c-7", "tools": CHAT_TOOLS, "messages": history}
    m, invs, q = collect(collect_config, tmp_path, write_jsonl(tmp_path / "history.jsonl", [record]))
    assert m.extra["formats"] == {"trajectory": 1} and q == []
    check_conversation(invs, reference(collect_config, tmp_path), usage=None)
