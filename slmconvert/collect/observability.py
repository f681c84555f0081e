"""Readers for the places production agents keep their LLM calls: tracing and gateway exports.

- `otel`: OpenTelemetry spans (OTLP JSON as the collector's file exporter writes it, or one span
  per line / array element): the GenAI semantic conventions (`gen_ai.input.messages` with
  `parts`, `gen_ai.system_instructions`, `gen_ai.tool.definitions`, `gen_ai.usage.*`,
  `gen_ai.conversation.id`), the older indexed attributes (`gen_ai.prompt.N.*`,
  `gen_ai.completion.N.tool_calls.M.*`, `llm.request.functions.N.*`) and OpenInference
  (`llm.input_messages.N.message.*`, `llm.tools.N.tool.json_schema`, `session.id`).
- `langfuse`: observation exports (`type: GENERATION`), or traces holding their observations.
- `litellm`: LiteLLM's `StandardLoggingPayload` (callback and bucket logs).
- `langsmith`: LangSmith run exports (`run_type: llm`), LangChain-serialised or raw OpenAI.
- `openai-batch`: OpenAI Batch API output lines joined with their input file's request lines.

Only LLM calls become invocations; other spans, observations and runs are counted as dropped.
The conversation (or thread) id is the session; without one, the trace is.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from slmconvert.collect.dialects import STOP_REASONS, maybe_json
from slmconvert.collect.formats import KEPT_PARAMS, LogFormat, ParseContext, RequestResponseFormat, log_formats
from slmconvert.invocation import Invocation, RecordError, normalize_timestamp

_CALL = RequestResponseFormat()


def _id(value: Any) -> str | None:
    return str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value) else None


def _seconds(value: Any) -> float | None:
    """Epoch seconds of a time given as nanoseconds (OTLP), seconds, or an ISO string (None: not a number)."""
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if value > 1e17:
        return value / 1e9
    if value > 1e14:
        return value / 1e6
    if value > 1e11:
        return value / 1e3
    return float(value)


def _elapsed_ms(start: Any, end: Any) -> float | None:
    a, b = _seconds(start), _seconds(end)
    if a is None or b is None:
        try:
            sa, sb = normalize_timestamp(start, "start"), normalize_timestamp(end, "end")
        except RecordError:
            return None
        if not sa or not sb:
            return None
        a, b = datetime.fromisoformat(sa.replace("Z", "+00:00")).timestamp(), datetime.fromisoformat(sb.replace("Z", "+00:00")).timestamp()
    return round((b - a) * 1000, 3) if b >= a else None


def _timestamp(value: Any) -> Any:
    s = _seconds(value)
    return s if s is not None else value


def _params(*sources: Any) -> dict:
    out: dict[str, Any] = {}
    for src in sources:
        src = maybe_json(src)
        if isinstance(src, dict):
            out.update({k: src[k] for k in KEPT_PARAMS if k in src and src[k] is not None})
    return out


def _each(items: list, ctx: ParseContext, where: str, parse: Callable[[Any, ParseContext], list[Invocation]]) -> list[Invocation]:
    """Parse the parts of one record separately: a bad part is quarantined, its neighbours kept."""
    out = []
    for i, item in enumerate(items):
        sub = dataclasses.replace(ctx, locator=f"{ctx.locator} {where}[{i}]")
        try:
            out.extend(parse(item, sub))
        except RecordError as e:
            ctx.bad.append((sub.locator, e.reason, e.code))
    return out


# --------------------------------------------------------------------------- OpenTelemetry


def _any_value(v: Any) -> Any:
    """An OTLP AnyValue ({"stringValue": ...}, {"arrayValue": {"values": [...]}}, ...) as a Python value."""
    if not isinstance(v, dict):
        return v
    for key in ("stringValue", "boolValue", "doubleValue", "bytesValue"):
        if key in v:
            return v[key]
    if "intValue" in v:
        try:
            return int(v["intValue"])
        except (TypeError, ValueError):
            return v["intValue"]
    if "arrayValue" in v:
        return [_any_value(x) for x in (v["arrayValue"] or {}).get("values", [])]
    if "kvlistValue" in v:
        return {kv.get("key"): _any_value(kv.get("value")) for kv in (v["kvlistValue"] or {}).get("values", []) if isinstance(kv, dict)}
    return None


def _attributes(raw: Any) -> dict[str, Any]:
    """Span attributes from OTLP's [{"key", "value": AnyValue}] list or an SDK's plain mapping."""
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, list):
        return {a["key"]: _any_value(a.get("value")) for a in raw if isinstance(a, dict) and isinstance(a.get("key"), str)}
    return {}


def _indexed(attrs: dict[str, Any], prefix: str) -> list[dict]:
    """Attributes flattened with indices (`gen_ai.prompt.0.tool_calls.1.name`) as a list of nested objects."""
    tree: dict = {}
    for key, value in attrs.items():
        if not key.startswith(prefix):
            continue
        node = tree
        parts = key[len(prefix):].split(".")
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                nxt = node[p] = {"": nxt}
            node = nxt
        node[parts[-1]] = value
    return _listify(tree) if tree else []


def _listify(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    if node and all(k.isdigit() for k in node):
        return [_listify(node[k]) for k in sorted(node, key=int)]
    return {k: _listify(v) for k, v in node.items()}


def _indexed_message(m: Any) -> Any:
    """A message rebuilt from indexed attributes: OpenLLMetry's `gen_ai.prompt.N` or OpenInference's
    `llm.input_messages.N.message` (with `contents.K.message_content` and `tool_calls.M.tool_call`)."""
    if not isinstance(m, dict):
        return m
    m = m.get("message", m) if isinstance(m.get("message"), dict) else m
    out = {k: v for k, v in m.items() if k not in ("contents", "tool_calls", "function_call")}
    if "content" not in out and isinstance(m.get("contents"), list):
        texts = [c.get("message_content", c) for c in m["contents"] if isinstance(c, dict)]
        out["content"] = "".join(t.get("text", "") for t in texts if isinstance(t, dict) and t.get("type", "text") == "text")
    calls = m.get("tool_calls")
    if isinstance(calls, list) and calls:
        out["tool_calls"] = [c.get("tool_call", c) if isinstance(c, dict) else c for c in calls]
    elif isinstance(m.get("function_call"), dict):
        out["tool_calls"] = [m["function_call"]]
    if out.get("content") is None and "tool_calls" not in out:
        out.setdefault("content", "")
    return out


def _span_tools(attrs: dict[str, Any]) -> Any:
    tools = maybe_json(attrs.get("gen_ai.tool.definitions"))
    if tools is not None:
        return tools
    fns = _indexed(attrs, "llm.request.functions.")
    if fns:
        return [{"name": f.get("name"), "description": f.get("description", ""),
                 "parameters": maybe_json(f.get("parameters")) or {"type": "object", "properties": {}}} for f in fns if isinstance(f, dict)]
    oi = _indexed(attrs, "llm.tools.")
    if oi:
        return [maybe_json(t.get("tool", {}).get("json_schema")) if isinstance(t, dict) else t for t in oi]
    return None


LLM_OPERATIONS = {"chat", "text_completion", "generate_content", "completion", "responses", "generate"}
CONTENT_PREFIXES = ("gen_ai.prompt.", "gen_ai.completion.", "llm.input_messages.", "llm.output_messages.")


def _is_llm_span(attrs: dict[str, Any]) -> bool:
    kind = attrs.get("openinference.span.kind")
    if kind is not None:
        return str(kind).upper() == "LLM"
    op = attrs.get("gen_ai.operation.name")
    if op is not None:
        return str(op) in LLM_OPERATIONS
    if attrs.get("llm.request.type") is not None:
        return str(attrs["llm.request.type"]) in ("chat", "completion")
    return "gen_ai.input.messages" in attrs or any(k.startswith(CONTENT_PREFIXES) for k in attrs)


def _event_content(span: dict, name: str, key: str) -> Any:
    """Content an instrumentation put in a span event instead of an attribute (`gen_ai.content.prompt`)."""
    for ev in span.get("events") or []:
        if isinstance(ev, dict) and ev.get("name") == name:
            return maybe_json(_attributes(ev.get("attributes")).get(key))
    return None


@log_formats.register("otel")
class OtelFormat(LogFormat):
    """OpenTelemetry GenAI / OpenLLMetry / OpenInference spans: OTLP JSON (`resourceSpans`) or one span per record."""

    name = "otel"
    description = ("OpenTelemetry spans: OTLP JSON (collector file exporter) or JSONL of spans; GenAI semantic "
                   "conventions, gen_ai.prompt.N / llm.request.functions.N, OpenInference llm.input_messages.N")

    @staticmethod
    def _is_span(r: Any) -> bool:
        if not isinstance(r, dict):
            return False
        ctx = r.get("context") if isinstance(r.get("context"), dict) else {}
        has_trace = any(isinstance(x, str) for x in (r.get("traceId"), r.get("trace_id"), ctx.get("trace_id")))
        return has_trace and ("attributes" in r) and ("spanId" in r or "span_id" in r or "span_id" in ctx)

    def owns(self, record: Any) -> bool:
        return isinstance(record, dict) and isinstance(record.get("resourceSpans"), list) or self._is_span(record)

    sniff = owns

    def parse(self, record: Any, ctx: ParseContext) -> list[Invocation]:
        if self._is_span(record):
            return self._span(record, {}, ctx)
        if not (isinstance(record, dict) and isinstance(record.get("resourceSpans"), list)):
            raise RecordError("neither an OTLP export (resourceSpans) nor a span (traceId, spanId, attributes)", "missing_field")
        out = []
        for r, rs in enumerate(record["resourceSpans"]):
            if not isinstance(rs, dict):
                ctx.bad.append((f"{ctx.locator} resourceSpans[{r}]", "not an object", "wrong_type"))
                continue
            resource = _attributes(rs["resource"].get("attributes")) if isinstance(rs.get("resource"), dict) else {}
            scopes = rs.get("scopeSpans", rs.get("instrumentationLibrarySpans")) or []
            for s, ss in enumerate(scopes if isinstance(scopes, list) else []):
                spans = ss.get("spans") if isinstance(ss, dict) else None
                out.extend(_each(spans if isinstance(spans, list) else [], ctx, f"resourceSpans[{r}].scopeSpans[{s}].spans",
                                 lambda span, sub: self._span(span, resource, sub)))
        return out

    def _span(self, span: Any, resource: dict, ctx: ParseContext) -> list[Invocation]:
        if not isinstance(span, dict):
            raise RecordError("a span must be an object", "wrong_type")
        attrs = _attributes(span.get("attributes"))
        if not _is_llm_span(attrs):
            ctx.drop("non_llm_spans")
            return []
        sctx = span.get("context") if isinstance(span.get("context"), dict) else {}
        trace = _id(span.get("traceId", span.get("trace_id", sctx.get("trace_id"))))
        span_id = _id(span.get("spanId", span.get("span_id", sctx.get("span_id"))))
        status = span.get("status") if isinstance(span.get("status"), dict) else {}
        if status.get("code") in (2, "2", "STATUS_CODE_ERROR", "ERROR") or status.get("status_code") == "ERROR":
            raise RecordError(f"the logged call failed: {str(status.get('message') or status.get('description') or 'span status ERROR')[:200]}",
                              "failed_call")
        messages = maybe_json(attrs.get("gen_ai.input.messages"))
        output = maybe_json(attrs.get("gen_ai.output.messages"))
        if messages is None and output is None:
            prompt = _indexed(attrs, "gen_ai.prompt.") or _indexed(attrs, "llm.input_messages.")
            completion = _indexed(attrs, "gen_ai.completion.") or _indexed(attrs, "llm.output_messages.")
            messages = [_indexed_message(m) for m in prompt] or _event_content(span, "gen_ai.content.prompt", "gen_ai.prompt")
            outs = [_indexed_message(m) for m in completion] or _event_content(span, "gen_ai.content.completion", "gen_ai.completion")
            output = {"role": "assistant", **outs[0]} if isinstance(outs, list) and outs and isinstance(outs[0], dict) else outs
            finish = completion[0].get("finish_reason") if completion and isinstance(completion[0], dict) else None
        else:
            finish = None
        if not messages and output is None:
            raise RecordError("LLM span carries no messages: its instrumentation did not record content "
                              "(e.g. OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true)", "no_content")
        if output is None or output == []:
            raise RecordError("LLM span has input messages but no output messages", "empty_response")
        if not isinstance(messages, list):
            raise RecordError("gen_ai.input.messages is not a list of messages", "wrong_type")
        system = attrs.get("gen_ai.system_instructions")
        body: dict[str, Any] = {"messages": messages, "tools": _span_tools(attrs),
                                **_params({k.split(".")[-1]: v for k, v in attrs.items() if k.startswith("gen_ai.request.")},
                                          attrs.get("llm.invocation_parameters"))}
        if system is not None:
            body["system"] = system
        if body["tools"] is None:
            del body["tools"]
        reasons = maybe_json(attrs.get("gen_ai.response.finish_reasons"))
        finish = finish or (reasons[0] if isinstance(reasons, list) and reasons and isinstance(reasons[0], str) else None)
        conv = _id(attrs.get("gen_ai.conversation.id"))
        oi_session = _id(attrs.get("session.id"))
        session = f"conversation_id:{conv}" if conv else f"session_id:{oi_session}" if oi_session else f"trace_id:{trace}" if trace else None
        start = span.get("startTimeUnixNano", span.get("start_time"))
        record = {
            "timestamp": _timestamp(start),
            "usage": {"input_tokens": attrs.get("gen_ai.usage.input_tokens", attrs.get("gen_ai.usage.prompt_tokens", attrs.get("llm.token_count.prompt"))),
                      "output_tokens": attrs.get("gen_ai.usage.output_tokens", attrs.get("gen_ai.usage.completion_tokens", attrs.get("llm.token_count.completion")))},
            "latency_ms": _elapsed_ms(start, span.get("endTimeUnixNano", span.get("end_time"))),
            "model": attrs.get("gen_ai.response.model") or attrs.get("gen_ai.request.model") or attrs.get("llm.model_name"),
            "agent": attrs.get("gen_ai.agent.name"),
            "trace": trace, "span": span_id, "span_name": span.get("name"), "service": resource.get("service.name"),
            "provider": attrs.get("gen_ai.provider.name", attrs.get("gen_ai.system", attrs.get("llm.provider"))),
        }
        record = {k: v for k, v in record.items() if v is not None}
        sub = dataclasses.replace(ctx, locator=f"{ctx.locator} span {span_id}" if span_id and "span" not in ctx.locator else ctx.locator)
        inv = _CALL.call(record, body, output, sub, "span", "span output", session=session)
        if finish:
            inv.response.finish_reason = STOP_REASONS.get(finish, finish)
        return [inv]


# --------------------------------------------------------------------------- Langfuse

OBSERVATION_TYPES = {"GENERATION", "SPAN", "EVENT", "AGENT", "TOOL", "CHAIN", "RETRIEVER", "EMBEDDING", "EVALUATOR", "GUARDRAIL"}


def _as_request(inp: Any, where: str) -> dict:
    """A logged input as a request body: {messages, tools} / a request body, a message list, or a prompt string."""
    inp = maybe_json(inp)
    if isinstance(inp, dict) and ("messages" in inp or "input" in inp):
        return inp
    if isinstance(inp, list):
        return {"messages": inp}
    if isinstance(inp, str) and inp:
        return {"messages": [{"role": "user", "content": inp}]}
    raise RecordError(f"{where} holds no messages", "missing_field")


@log_formats.register("langfuse")
class LangfuseFormat(LogFormat):
    """Langfuse observation exports (JSON / JSONL); traces holding their observations also read."""

    name = "langfuse"
    description = "Langfuse observations (type GENERATION: input, output, usageDetails, traceId) or traces with observations"

    def owns(self, record: Any) -> bool:
        if not isinstance(record, dict):
            return False
        if record.get("type") in OBSERVATION_TYPES and ("traceId" in record or "trace_id" in record):
            return True
        return isinstance(record.get("observations"), list) and "id" in record and ("sessionId" in record or "userId" in record
                                                                                    or "htmlPath" in record or "timestamp" in record)

    sniff = owns

    def parse(self, record: Any, ctx: ParseContext) -> list[Invocation]:
        if not isinstance(record, dict):
            raise RecordError(f"record must be an object, got {type(record).__name__}", "wrong_type")
        if isinstance(record.get("observations"), list) and "type" not in record:  # a trace
            obs = record["observations"]
            if obs and all(isinstance(o, str) for o in obs):
                raise RecordError("this trace lists only observation ids: export the observations "
                                  "(GET /api/public/observations, or the trace with full observations)", "missing_field")
            session = _id(record.get("sessionId"))
            trace = _id(record.get("id"))
            return _each(obs, ctx, "observations", lambda o, sub: self._observation(
                {**o, "sessionId": o.get("sessionId") or session, "traceId": o.get("traceId") or trace} if isinstance(o, dict) else o, sub))
        return self._observation(record, ctx)

    def _observation(self, obs: Any, ctx: ParseContext) -> list[Invocation]:
        if not isinstance(obs, dict):
            raise RecordError("an observation must be an object", "wrong_type")
        if obs.get("type") != "GENERATION":
            ctx.drop("non_generation_observations")
            return []
        if obs.get("level") == "ERROR":
            raise RecordError(f"the logged call failed: {str(obs.get('statusMessage') or 'level ERROR')[:200]}", "failed_call")
        body = dict(_as_request(obs.get("input"), "input"))
        params = _params(obs.get("modelParameters"))
        body = {**params, **body}
        meta = obs.get("metadata") if isinstance(obs.get("metadata"), dict) else {}
        if "tools" not in body and isinstance(meta.get("tools"), list):
            body["tools"] = meta["tools"]
        output = obs.get("output")
        if output is None:
            raise RecordError("output is missing (the generation logged no answer)", "empty_response")
        session = _id(obs.get("sessionId"))
        trace = _id(obs.get("traceId", obs.get("trace_id")))
        cost = obs.get("calculatedTotalCost", obs.get("totalCost"))
        if cost is None and isinstance(obs.get("costDetails"), dict):
            cost = obs["costDetails"].get("total")
        record = {
            "timestamp": obs.get("startTime"),
            "usage": obs.get("usageDetails") if isinstance(obs.get("usageDetails"), dict) else obs.get("usage"),
            "latency_ms": _elapsed_ms(obs.get("startTime"), obs.get("endTime")),
            "cost_usd": cost if isinstance(cost, (int, float)) and not isinstance(cost, bool) and cost >= 0 else None,
            "model": obs.get("model"),
            "observation": _id(obs.get("id")), "name": obs.get("name"), "trace": trace,
        }
        record = {k: v for k, v in record.items() if v is not None}
        sess = f"session_id:{session}" if session else f"trace_id:{trace}" if trace else None
        return [_CALL.call(record, body, output, ctx, "input", "output", session=sess)]


# --------------------------------------------------------------------------- LiteLLM


@log_formats.register("litellm")
class LiteLLMFormat(LogFormat):
    """LiteLLM `StandardLoggingPayload` records (custom callbacks, s3/gcs bucket logging)."""

    name = "litellm"
    description = "LiteLLM StandardLoggingPayload (callback / bucket logs: messages, response, model_parameters, trace_id)"

    def sniff(self, record: Any) -> bool:
        return (isinstance(record, dict) and "messages" in record and ("response" in record or "status" in record)
                and any(k in record for k in ("call_type", "response_cost", "model_parameters", "hidden_params")))

    def parse(self, record: Any, ctx: ParseContext) -> list[Invocation]:
        if not isinstance(record, dict):
            raise RecordError(f"record must be an object, got {type(record).__name__}", "wrong_type")
        status = record.get("status")
        if status not in (None, "success"):
            info = record.get("error_information") if isinstance(record.get("error_information"), dict) else {}
            why = record.get("error_str") or info.get("error_message") or f"status {status}"
            raise RecordError(f"the logged call failed: {str(why)[:200]}", "failed_call")
        body = dict(_as_request(record.get("messages"), "messages"))
        mp = maybe_json(record.get("model_parameters"))
        mp = mp if isinstance(mp, dict) else {}
        body.update(_params(mp))
        if "tools" not in body and (mp.get("tools") or mp.get("functions")):
            body["tools"] = mp.get("tools") or mp.get("functions")
        response = record.get("response")
        if response is None or response == "" or response == {}:
            raise RecordError("response is empty (the call logged no answer)", "empty_response")
        trace = _id(record.get("trace_id"))
        user = _id(record.get("end_user"))
        rec = {
            "timestamp": record.get("startTime"),
            "usage": {"prompt_tokens": record.get("prompt_tokens"), "completion_tokens": record.get("completion_tokens")},
            "latency_ms": _elapsed_ms(record.get("startTime"), record.get("endTime")),
            "cost_usd": record.get("response_cost") if isinstance(record.get("response_cost"), (int, float)) and not isinstance(record.get("response_cost"), bool) else None,
            "model": record.get("model"), "call": _id(record.get("id")), "model_group": record.get("model_group"),
            "cache_hit": record.get("cache_hit") if isinstance(record.get("cache_hit"), bool) else None,
        }
        rec = {k: v for k, v in rec.items() if v is not None}
        if user and not trace:
            rec["user_id"] = user  # a session hint only (the opening turns and the user name a conversation)
        return [_CALL.call(rec, body, response, ctx, "messages", "response", session=f"trace_id:{trace}" if trace else None)]


# --------------------------------------------------------------------------- LangSmith

THREAD_KEYS = ("session_id", "thread_id", "conversation_id")


@log_formats.register("langsmith")
class LangSmithFormat(LogFormat):
    """LangSmith run exports (JSONL of runs): LangChain-serialised messages and generations, or the raw
    OpenAI request and response of a wrapped client."""

    name = "langsmith"
    description = "LangSmith runs (run_type llm; LangChain messages and outputs.generations, or raw OpenAI bodies; trace_id)"

    def sniff(self, record: Any) -> bool:
        return isinstance(record, dict) and "run_type" in record and ("inputs" in record or "outputs" in record)

    def parse(self, record: Any, ctx: ParseContext) -> list[Invocation]:
        if not isinstance(record, dict):
            raise RecordError(f"record must be an object, got {type(record).__name__}", "wrong_type")
        if record.get("run_type") != "llm":
            ctx.drop("non_llm_runs")
            return []
        if record.get("error") or record.get("status") == "error":
            raise RecordError(f"the logged call failed: {str(record.get('error') or 'status error')[:200]}", "failed_call")
        inputs = maybe_json(record.get("inputs"))
        inputs = inputs if isinstance(inputs, dict) else {}
        messages = inputs.get("messages")
        if isinstance(messages, list) and messages and isinstance(messages[0], list):
            if len(messages) > 1:
                ctx.note("langsmith_batched_prompts_first_kept")
            messages = messages[0]
        if messages is None and isinstance(inputs.get("prompts"), list) and inputs["prompts"]:
            messages = [{"role": "user", "content": inputs["prompts"][0]}]
        if messages is None and isinstance(inputs.get("input"), (str, list)):
            messages = inputs["input"] if isinstance(inputs["input"], list) else [{"role": "user", "content": inputs["input"]}]
        if not isinstance(messages, list):
            raise RecordError("inputs hold no messages (inputs.messages / inputs.prompts)", "missing_field")
        extra = record.get("extra") if isinstance(record.get("extra"), dict) else {}
        inv_params = extra.get("invocation_params") if isinstance(extra.get("invocation_params"), dict) else {}
        metadata = extra.get("metadata") if isinstance(extra.get("metadata"), dict) else {}
        body: dict[str, Any] = {"messages": messages, **_params(inv_params, inputs)}
        tools = inputs.get("tools") or inv_params.get("tools") or inv_params.get("functions")
        if tools:
            body["tools"] = tools
        if "system" in inputs:
            body["system"] = inputs["system"]
        outputs = maybe_json(record.get("outputs"))
        if not isinstance(outputs, dict) or not outputs:
            raise RecordError("outputs are missing (the run logged no answer)", "empty_response")
        answer, usage = self._answer(outputs)
        thread = next((f"{k}:{v}" for k in THREAD_KEYS if (v := _id(metadata.get(k)))), None)
        trace = _id(record.get("trace_id"))
        rec = {
            "timestamp": record.get("start_time"),
            "usage": usage or {"prompt_tokens": record.get("prompt_tokens"), "completion_tokens": record.get("completion_tokens")},
            "latency_ms": _elapsed_ms(record.get("start_time"), record.get("end_time")),
            "model": inv_params.get("model") or inv_params.get("model_name") or metadata.get("ls_model_name"),
            "run": _id(record.get("id")), "name": record.get("name"),
        }
        rec = {k: v for k, v in rec.items() if v is not None}
        return [_CALL.call(rec, body, answer, ctx, "inputs", "outputs",
                           session=thread or (f"trace_id:{trace}" if trace else None))]

    @staticmethod
    def _answer(outputs: dict) -> tuple[Any, Any]:
        """The answer of a run's outputs and the usage it reports."""
        llm_output = outputs.get("llm_output") if isinstance(outputs.get("llm_output"), dict) else {}
        usage = llm_output.get("token_usage") or llm_output.get("usage") or outputs.get("usage")
        gens = outputs.get("generations")
        if isinstance(gens, list) and gens:
            g = gens[0][0] if isinstance(gens[0], list) and gens[0] else gens[0]
            if not isinstance(g, dict):
                raise RecordError("outputs.generations[0] is not an object", "wrong_type")
            answer = g.get("message") if g.get("message") is not None else g.get("text")
            if answer is None:
                raise RecordError("outputs.generations[0] has neither a message nor text", "empty_response")
            return answer, usage
        for key in ("output", "message"):
            if outputs.get(key) is not None and "choices" not in outputs:
                return outputs[key], usage
        return outputs, usage


# --------------------------------------------------------------------------- OpenAI Batch


@log_formats.register("openai-batch")
class OpenAIBatchFormat(LogFormat):
    """OpenAI Batch API files: output lines (`custom_id`, `response.body`) joined by `custom_id` with the
    request lines of their input file, read in the same run or found beside the output file."""

    name = "openai-batch"
    description = "OpenAI Batch output lines (custom_id, response.body) joined with their input file's request lines"
    KEY = "openai-batch"

    def sniff(self, record: Any) -> bool:
        if not isinstance(record, dict) or not isinstance(record.get("custom_id"), str):
            return False
        resp = record.get("response")
        return isinstance(record.get("body"), dict) or isinstance(resp, dict) and ("body" in resp or "status_code" in resp) \
            or "error" in record

    @staticmethod
    def _state(ctx_or_shared: Any) -> dict:
        shared = ctx_or_shared.shared if isinstance(ctx_or_shared, ParseContext) else ctx_or_shared
        return shared.setdefault(OpenAIBatchFormat.KEY, {"requests": {}, "answers": {}})

    def parse(self, record: Any, ctx: ParseContext) -> list[Invocation]:
        if not isinstance(record, dict) or not isinstance(record.get("custom_id"), str):
            raise RecordError("a batch line needs a custom_id", "missing_field")
        state = self._state(ctx)
        key = (str(Path(ctx.path).parent), record["custom_id"])
        if isinstance(record.get("body"), dict):  # a request line of the input file
            old = state["requests"].get(key)
            if old is not None and old[0] != record["body"]:
                raise RecordError(f"custom_id {record['custom_id']!r} names two different requests in {key[0]} "
                                  f"(also {old[1]} {old[2]}): keep each batch's files in their own folder", "ambiguous_batch_id")
            state["requests"][key] = (record["body"], ctx.path, ctx.locator)
            answer = state["answers"].pop(key, None)
            return [self._join(record["body"], *answer, ctx)] if answer else []
        resp = record.get("response") if isinstance(record.get("response"), dict) else {}
        err = record.get("error")
        status = resp.get("status_code")
        if err or (isinstance(status, int) and status >= 400):
            body = resp.get("body") if isinstance(resp.get("body"), dict) else {}
            why = (err.get("message") if isinstance(err, dict) else err) or (body.get("error") or {}).get("message") or f"status {status}"
            raise RecordError(f"the batched call failed: {str(why)[:200]}", "failed_call")
        if not isinstance(resp.get("body"), dict):
            raise RecordError("response.body is missing", "missing_field")
        answer = (resp["body"], record["custom_id"], ctx.path, ctx.locator)
        request = state["requests"].get(key)
        if request is not None:
            return [self._join(request[0], *answer, ctx)]
        state["answers"][key] = answer
        return []

    def _join(self, request: dict, response: dict, custom_id: str, path: str, locator: str, ctx: ParseContext) -> Invocation:
        sub = dataclasses.replace(ctx, path=path, locator=locator)
        return _CALL.call({"custom_id": custom_id}, request, response, sub, "body", "response.body")

    def finish(self, shared: dict[str, Any], new_ctx: Callable[[str, str], ParseContext]
               ) -> tuple[list[Invocation], list[tuple[str, str, str, str]]]:
        state = shared.get(self.KEY)
        if not state or not state["answers"]:
            return [], []
        waiting = state["answers"]
        for folder in sorted({k[0] for k in waiting}):  # the input file was read by an earlier run, or never listed
            wanted = {cid for f, cid in waiting if f == folder}
            for path in sorted(Path(folder).iterdir()):
                if not wanted or not path.is_file() or not path.name.lower().endswith((".jsonl", ".jsonl.gz", ".ndjson")):
                    continue
                for custom_id, body in _request_lines(path, wanted):
                    state["requests"][(folder, custom_id)] = (body, str(path), "")
                    wanted.discard(custom_id)
        out, bad = [], []
        for key, (response, custom_id, path, locator) in sorted(waiting.items()):
            request = state["requests"].get(key)
            if request is None:
                bad.append((path, locator, f"no request line with custom_id {custom_id!r} in the files read or in {key[0]}: "
                                           "collect the batch's input file with its output", "missing_request"))
                continue
            ctx = new_ctx(path, locator)
            try:
                out.append(self._join(request[0], response, custom_id, path, locator, ctx))
            except RecordError as e:
                bad.append((path, locator, e.reason, e.code))
        waiting.clear()
        return out, bad


def _request_lines(path: Path, wanted: set[str]):
    """(custom_id, body) of the batch request lines of a JSONL file that answer `wanted`."""
    from slmconvert.collect.records import RawRecord, UnreadableFile, read_records

    try:
        with read_records(path) as (layout, items, _):
            if layout != "lines":
                return
            for item in items:
                v = item.value if isinstance(item, RawRecord) else None
                if isinstance(v, dict) and v.get("custom_id") in wanted and isinstance(v.get("body"), dict):
                    yield v["custom_id"], v["body"]
    except (UnreadableFile, OSError):
        return
