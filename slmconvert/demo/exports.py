"""The demo agent's calls written the way other tools log them: Anthropic Messages and OpenAI Responses
bodies, OpenTelemetry GenAI spans (OTLP JSON), Langfuse observations, LiteLLM standard logging
payloads and LangSmith runs.

Each writer takes the chat-completions records `generate` makes (one call each) and returns the
records of its format. `collect` reads every one of them back to the same prompts, tools and
answers, which is what the tests check and what `benchmarks/collect_speed.py --formats` times.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any, Callable, Iterable


def _epoch(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def _hex(text: str, n: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def _args(call: dict) -> dict:
    a = call["function"]["arguments"]
    return json.loads(a) if isinstance(a, str) else a


def _answer(rec: dict) -> dict:
    return rec["response"]["choices"][0]["message"]


def _usage(rec: dict) -> tuple[int, int]:
    u = rec["response"]["usage"]
    return u["prompt_tokens"], u["completion_tokens"]


def _end(rec: dict) -> float:
    return _epoch(rec["timestamp"]) + rec["latency_ms"] / 1000


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------- Anthropic Messages


def _anthropic_messages(messages: list[dict]) -> tuple[str | None, list[dict]]:
    system, out = None, []
    for m in messages:
        if m["role"] == "system":
            system = m["content"]
        elif m["role"] == "tool":
            block = {"type": "tool_result", "tool_use_id": m["tool_call_id"], "content": m["content"]}
            if out and out[-1]["role"] == "user" and isinstance(out[-1]["content"], list):
                out[-1]["content"].append(block)
            else:
                out.append({"role": "user", "content": [block]})
        elif m["role"] == "assistant":
            out.append({"role": "assistant", "content": _anthropic_blocks(m)})
        else:
            out.append({"role": "user", "content": m["content"]})
    return system, out


def _anthropic_blocks(m: dict) -> list[dict]:
    blocks = [{"type": "text", "text": m["content"]}] if m.get("content") else []
    blocks += [{"type": "tool_use", "id": c["id"], "name": c["function"]["name"], "input": _args(c)} for c in m.get("tool_calls") or []]
    return blocks


def anthropic(records: Iterable[dict]) -> Iterable[dict]:
    for rec in records:
        req = rec["request"]
        system, messages = _anthropic_messages(req["messages"])
        body: dict[str, Any] = {"model": "claude-sonnet-4-5", "max_tokens": 1024, "messages": messages}
        if system:
            body["system"] = system
        if req.get("tools"):
            body["tools"] = [{"name": t["function"]["name"], "description": t["function"]["description"],
                              "input_schema": t["function"]["parameters"]} for t in req["tools"]]
        msg = _answer(rec)
        p, c = _usage(rec)
        yield {"timestamp": rec["timestamp"], "session_id": rec["session_id"], "workload_id": rec["workload_id"],
               "latency_ms": rec["latency_ms"], "request": body,
               "response": {"id": "msg_" + _hex(rec["response"]["id"], 24), "type": "message", "role": "assistant",
                            "model": "claude-sonnet-4-5", "content": _anthropic_blocks(msg),
                            "stop_reason": "tool_use" if msg.get("tool_calls") else "end_turn",
                            "usage": {"input_tokens": p, "output_tokens": c}}}


# --------------------------------------------------------------------------- OpenAI Responses


def _response_items(m: dict) -> list[dict]:
    if m["role"] == "tool":
        return [{"type": "function_call_output", "call_id": m["tool_call_id"], "output": m["content"]}]
    if m["role"] == "assistant":
        items = [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": m["content"]}]}] \
            if m.get("content") else []
        return items + [{"type": "function_call", "call_id": c["id"], "name": c["function"]["name"],
                         "arguments": json.dumps(_args(c))} for c in m.get("tool_calls") or []]
    return [{"role": m["role"], "content": [{"type": "input_text", "text": m["content"]}]}]


def responses(records: Iterable[dict]) -> Iterable[dict]:
    """Request/response pairs of the Responses API, bodies stored as JSON strings (as some gateways do)."""
    for rec in records:
        req = rec["request"]
        system = [m["content"] for m in req["messages"] if m["role"] == "system"]
        body: dict[str, Any] = {"model": req["model"], "input": [i for m in req["messages"] if m["role"] != "system"
                                                                for i in _response_items(m)]}
        if system:
            body["instructions"] = system[0]
        if req.get("tools"):
            body["tools"] = [{"type": "function", **t["function"]} for t in req["tools"]]
        p, c = _usage(rec)
        out = {"id": "resp_" + _hex(rec["response"]["id"], 24), "object": "response", "status": "completed",
               "model": req["model"], "output": _response_items(_answer(rec)), "usage": {"input_tokens": p, "output_tokens": c}}
        yield {"timestamp": rec["timestamp"], "conversation_id": rec["session_id"], "workload_id": rec["workload_id"],
               "request_body": json.dumps(body), "response_body": json.dumps(out)}


# --------------------------------------------------------------------------- OpenTelemetry GenAI


def _parts(m: dict) -> dict:
    if m["role"] == "tool":
        return {"role": "tool", "parts": [{"type": "tool_call_response", "id": m["tool_call_id"], "response": m["content"]}]}
    parts = [{"type": "text", "content": m["content"]}] if m.get("content") else []
    parts += [{"type": "tool_call", "id": c["id"], "name": c["function"]["name"], "arguments": _args(c)}
              for c in m.get("tool_calls") or []]
    return {"role": m["role"], "parts": parts}


def _attr(key: str, value: Any) -> dict:
    if isinstance(value, bool):
        v = {"boolValue": value}
    elif isinstance(value, int):
        v = {"intValue": str(value)}
    elif isinstance(value, float):
        v = {"doubleValue": value}
    else:
        v = {"stringValue": value if isinstance(value, str) else json.dumps(value)}
    return {"key": key, "value": v}


def otel(records: Iterable[dict]) -> Iterable[dict]:
    """One OTLP JSON line per conversation (as the collector's file exporter writes them): an agent span
    and one `chat` span per call, with the GenAI semantic conventions' content attributes."""
    by_session: dict[str, list[dict]] = {}
    for rec in records:
        by_session.setdefault(rec["session_id"], []).append(rec)
    for sid, recs in by_session.items():
        trace = _hex(sid, 32)
        root = _hex(sid + "/agent", 16)
        t0, t1 = _epoch(recs[0]["timestamp"]), _end(recs[-1])
        spans = [{"traceId": trace, "spanId": root, "parentSpanId": "", "name": f"invoke_agent {recs[0]['workload_id']}", "kind": 1,
                  "startTimeUnixNano": str(int(t0 * 1e9)), "endTimeUnixNano": str(int(t1 * 1e9)),
                  "attributes": [_attr("gen_ai.operation.name", "invoke_agent"), _attr("gen_ai.agent.name", recs[0]["workload_id"])],
                  "status": {}}]
        for k, rec in enumerate(recs):
            req = rec["request"]
            system = [m["content"] for m in req["messages"] if m["role"] == "system"]
            p, c = _usage(rec)
            msg = _answer(rec)
            attrs = [_attr("gen_ai.operation.name", "chat"), _attr("gen_ai.provider.name", "openai"),
                     _attr("gen_ai.request.model", req["model"]), _attr("gen_ai.response.model", rec["response"]["model"]),
                     _attr("gen_ai.request.temperature", float(req["temperature"])),
                     _attr("gen_ai.conversation.id", sid), _attr("gen_ai.agent.name", rec["workload_id"]),
                     _attr("gen_ai.input.messages", [_parts(m) for m in req["messages"] if m["role"] != "system"]),
                     _attr("gen_ai.output.messages", [{**_parts(msg), "finish_reason": "tool_call" if msg.get("tool_calls") else "stop"}]),
                     _attr("gen_ai.usage.input_tokens", p), _attr("gen_ai.usage.output_tokens", c)]
            if system:
                attrs.append(_attr("gen_ai.system_instructions", [{"type": "text", "content": system[0]}]))
            if req.get("tools"):
                attrs.append(_attr("gen_ai.tool.definitions", [{"type": "function", **t["function"]} for t in req["tools"]]))
            start = _epoch(rec["timestamp"])
            spans.append({"traceId": trace, "spanId": _hex(f"{sid}/{k}", 16), "parentSpanId": root, "name": f"chat {req['model']}",
                          "kind": 3, "startTimeUnixNano": str(int(start * 1e9)), "endTimeUnixNano": str(int(_end(rec) * 1e9)),
                          "attributes": attrs, "status": {}})
        yield {"resourceSpans": [{"resource": {"attributes": [_attr("service.name", recs[0]["client_id"])]},
                                  "scopeSpans": [{"scope": {"name": "demo.agent", "version": "1.0"}, "spans": spans}]}]}


# --------------------------------------------------------------------------- Langfuse


def langfuse(records: Iterable[dict]) -> Iterable[dict]:
    """Observations as Langfuse's API lists them (GENERATION, with the trace id and session id)."""
    for rec in records:
        req = rec["request"]
        p, c = _usage(rec)
        inp: dict[str, Any] = {"messages": req["messages"]}
        if req.get("tools"):
            inp["tools"] = req["tools"]
        yield {"id": _hex(rec["response"]["id"], 32), "traceId": _hex(rec["session_id"], 32), "sessionId": rec["session_id"],
               "type": "GENERATION", "name": rec["workload_id"], "startTime": rec["timestamp"], "endTime": _iso(_end(rec)),
               "model": rec["response"]["model"], "modelParameters": {"temperature": req["temperature"]},
               "input": inp, "output": _answer(rec), "usageDetails": {"input": p, "output": c, "total": p + c},
               "level": "DEFAULT", "statusMessage": None, "parentObservationId": None}


# --------------------------------------------------------------------------- LiteLLM


def litellm(records: Iterable[dict]) -> Iterable[dict]:
    """LiteLLM StandardLoggingPayload records (what its callbacks and bucket loggers write)."""
    for rec in records:
        req = rec["request"]
        p, c = _usage(rec)
        params: dict[str, Any] = {"temperature": req["temperature"]}
        if req.get("tools"):
            params["tools"] = req["tools"]
        start = _epoch(rec["timestamp"])
        yield {"id": rec["response"]["id"], "trace_id": rec["session_id"], "call_type": "acompletion", "stream": False,
               "response_cost": round((p * 2.5 + c * 10) / 1e6, 8), "status": "success",
               "total_tokens": p + c, "prompt_tokens": p, "completion_tokens": c,
               "startTime": start, "endTime": _end(rec), "completionStartTime": _end(rec),
               "model": rec["response"]["model"], "model_group": req["model"], "custom_llm_provider": "openai",
               "metadata": {"user_api_key_hash": _hex("sk-demo", 64), "user_api_key_alias": "demo", "requester_metadata": {}},
               "cache_hit": False, "messages": req["messages"], "response": rec["response"],
               "model_parameters": params, "error_str": None, "error_information": None}


# --------------------------------------------------------------------------- LangSmith


_LC_CLASSES = {"system": "SystemMessage", "user": "HumanMessage", "assistant": "AIMessage", "tool": "ToolMessage"}


def _lc(m: dict) -> dict:
    kwargs: dict[str, Any] = {"content": m.get("content") or "", "type": {"user": "human", "assistant": "ai"}.get(m["role"], m["role"])}
    if m.get("tool_calls"):
        kwargs["tool_calls"] = [{"name": c["function"]["name"], "args": _args(c), "id": c["id"], "type": "tool_call"}
                                for c in m["tool_calls"]]
    if m["role"] == "tool":
        kwargs["tool_call_id"] = m["tool_call_id"]
    return {"lc": 1, "type": "constructor", "id": ["langchain", "schema", "messages", _LC_CLASSES[m["role"]]], "kwargs": kwargs}


def langsmith(records: Iterable[dict]) -> Iterable[dict]:
    """LangSmith runs of a LangChain agent: a chain run per conversation and one llm run per call."""
    seen: set[str] = set()
    for rec in records:
        sid = rec["session_id"]
        trace = _hex(sid, 32)
        if sid not in seen:
            seen.add(sid)
            yield {"id": trace, "trace_id": trace, "name": "AgentExecutor", "run_type": "chain", "start_time": rec["timestamp"],
                   "inputs": {"input": "..."}, "outputs": {}, "extra": {"metadata": {"thread_id": sid}}}
        req = rec["request"]
        p, c = _usage(rec)
        msg = _answer(rec)
        gen_msg = _lc(msg)
        gen_msg["kwargs"]["response_metadata"] = {"finish_reason": "tool_calls" if msg.get("tool_calls") else "stop",
                                                  "model_name": rec["response"]["model"]}
        params: dict[str, Any] = {"model": req["model"], "temperature": req["temperature"]}
        if req.get("tools"):
            params["tools"] = req["tools"]
        yield {"id": _hex(rec["response"]["id"], 32), "trace_id": trace, "parent_run_id": trace, "name": "ChatOpenAI",
               "run_type": "llm", "start_time": rec["timestamp"], "end_time": _iso(_end(rec)), "status": "success", "error": None,
               "inputs": {"messages": [[_lc(m) for m in req["messages"]]]},
               "outputs": {"generations": [[{"text": msg.get("content") or "", "message": gen_msg, "type": "ChatGeneration",
                                             "generation_info": {"finish_reason": gen_msg["kwargs"]["response_metadata"]["finish_reason"]}}]],
                           "llm_output": {"token_usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
                                          "model_name": rec["response"]["model"]}},
               "extra": {"invocation_params": params, "metadata": {"thread_id": sid, "ls_provider": "openai"}},
               "prompt_tokens": p, "completion_tokens": c}


EXPORTS: dict[str, Callable[[Iterable[dict]], Iterable[dict]]] = {
    "anthropic": anthropic, "responses": responses, "otel": otel, "langfuse": langfuse, "litellm": litellm, "langsmith": langsmith,
}
