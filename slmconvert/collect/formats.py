"""Log formats: each maps one raw record to invocations in the shared data model.

Register a new one with `@log_formats.register("name")` on a `LogFormat` subclass; `sniff`
says whether a record looks like this format (used for auto-detection), `parse` maps it or
raises `RecordError` with a reason that lands in the quarantine file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from slmconvert.invocation import (
    Invocation,
    RecordError,
    Request,
    Response,
    Source,
    Usage,
    invocation_id,
    message_id,
    normalize_message,
    normalize_timestamp,
    response_from_message,
)
from slmconvert.io import canonical_json, sha256_text
from slmconvert.registry import Registry

# Request parameters worth keeping. Anything else in a request body (api keys, user ids,
# vendor extensions) is not stored.
KEPT_PARAMS = (
    "temperature", "top_p", "max_tokens", "max_completion_tokens", "response_format", "tool_choice",
    "stop", "seed", "n", "parallel_tool_calls", "presence_penalty", "frequency_penalty", "reasoning_effort",
)
SESSION_KEYS = ("session_id", "conversation_id", "thread_id", "trace_id", "chat_id", "dialog_id", "id")
# Keys whose values are credentials or transport details: never stored, counted as dropped.
SECRET_KEYS = {"headers", "authorization", "api_key", "apikey", "x-api-key", "api-key", "token", "access_token",
               "secret", "password", "cookie", "cookies", "request_headers", "response_headers"}
MESSAGE_LIST_KEYS = ("messages", "traj", "conversation", "history", "trajectory", "dialog", "turns")


@dataclass
class ParseContext:
    path: str
    locator: str
    format: str
    agent: str | None = None
    model: str | None = None
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n


class LogFormat:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def sniff(self, record: Any) -> bool:
        raise NotImplementedError

    def parse(self, record: Any, ctx: ParseContext) -> list[Invocation]:
        raise NotImplementedError


log_formats: Registry[type[LogFormat]] = Registry("log format")


def get_format(name: str) -> LogFormat:
    return log_formats.get(name)()


# --------------------------------------------------------------------------- shared helpers


def _scalar_meta(record: dict, skip: set[str], ctx: ParseContext, prefix: str = "", depth: int = 0) -> dict[str, Any]:
    """Scalar fields of a record, nested dicts flattened to dotted keys; credentials dropped."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if not prefix and key in skip:
            continue
        if str(key).lower() in SECRET_KEYS:
            ctx.drop("secret_fields")
            continue
        name = f"{prefix}{key}"
        if isinstance(value, (str, int, float, bool)) or value is None:
            out[name] = value
        elif isinstance(value, dict) and depth < 3:
            out.update(_scalar_meta(value, set(), ctx, f"{name}.", depth + 1))
    return out


def _normalize_tools(raw: Any, where: str) -> list[dict] | None:
    """Tools as OpenAI function schemas ({"type": "function", "function": {...}})."""
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise RecordError(f"{where}: tools must be a list, got {type(raw).__name__}")
    tools = []
    for i, t in enumerate(raw):
        if not isinstance(t, dict):
            raise RecordError(f"{where}[{i}]: a tool must be an object")
        fn = t.get("function") if isinstance(t.get("function"), dict) else t
        if not isinstance(fn.get("name"), str):
            raise RecordError(f"{where}[{i}]: tool has no name")
        spec = {"name": fn["name"], "description": fn.get("description", ""),
                "parameters": fn.get("parameters", fn.get("input_schema", {"type": "object", "properties": {}}))}
        tools.append({"type": "function", "function": spec})
    return tools or None


def _session_from(record: dict) -> str | None:
    for key in SESSION_KEYS:
        v = record.get(key)
        if isinstance(v, (str, int)) and not isinstance(v, bool) and str(v):
            return f"{key}:{v}"
    return None


def _usage(raw: Any) -> Usage | None:
    if not isinstance(raw, dict):
        return None
    p = raw.get("prompt_tokens", raw.get("input_tokens"))
    c = raw.get("completion_tokens", raw.get("output_tokens"))
    ok = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
    if not ok(p) and not ok(c):
        return None
    return Usage(p if ok(p) else None, c if ok(c) else None)


def _number(record: dict, keys: tuple[str, ...], where: str) -> float | None:
    for k in keys:
        if k in record and record[k] is not None:
            v = record[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise RecordError(f"{where}: {k} must be a non-negative number, got {v!r}", "wrong_type")
            return float(v)
    return None


def _messages(raw: Any, where: str) -> list[dict]:
    if not isinstance(raw, list):
        raise RecordError(f"{where}: messages must be a list, got {type(raw).__name__}", "wrong_type")
    return [normalize_message(m, f"{where}[{i}]") for i, m in enumerate(raw)]


def _make(ctx: ParseContext, session: str, step: int, messages: list[dict], tools: list[dict] | None,
          params: dict, response: Response, locator: str | None = None, **fields: Any) -> Invocation:
    inv_id = invocation_id(session, [message_id(m) for m in messages], tools, params, response)
    hci = fields.pop("hci", None)
    return Invocation(
        id=inv_id,
        source=Source(ctx.format, ctx.path, locator or ctx.locator),
        session_id=session,
        step=step,
        request=Request(messages=messages, tools=tools, params=params, tools_source="logged" if tools else None),
        response=response,
        agent=fields.pop("agent", None) or ctx.agent,
        model=fields.pop("model", None) or ctx.model,
        hci=bool(hci) if isinstance(hci, bool) else not response.tool_calls,
        **fields,
    )


# --------------------------------------------------------------------------- 1. request/response


@log_formats.register("request-response")
class RequestResponseFormat(LogFormat):
    """One record per LLM call: {"request": {chat-completions request}, "response": {chat.completion}}.

    The shape of NVIDIA's data-flywheel and most LLM gateways. Optional: timestamp, workload_id,
    client_id, latency_ms, usage, session_id / conversation_id / trace_id.
    """

    name = "request-response"
    description = 'JSONL of {"request": {...}, "response": {...}} (gateways, data-flywheel)'
    RECORD_KEYS = {"request", "response", "timestamp", "usage", "latency_ms", "duration_ms", "cost_usd", "cost",
                   "client_id", "workload_id", "agent", "model", "step", "hci", *SESSION_KEYS}

    def sniff(self, record: Any) -> bool:
        return isinstance(record, dict) and isinstance(record.get("request"), dict) and "response" in record

    def parse(self, record: Any, ctx: ParseContext) -> list[Invocation]:
        if not isinstance(record, dict):
            raise RecordError(f"record must be an object, got {type(record).__name__}", "wrong_type")
        req = record.get("request")
        if not isinstance(req, dict):
            raise RecordError("request must be an object", "missing_field")
        if "messages" not in req:
            raise RecordError("request.messages is missing", "missing_field")
        messages = _messages(req["messages"], "request.messages")
        tools = _normalize_tools(req.get("tools", req.get("functions")), "request.tools")
        params = {k: req[k] for k in KEPT_PARAMS if k in req}
        response, resp_model, resp_usage, created = self._response(record.get("response"))
        session = _session_from(record) or self._prefix_session(messages)
        step = record.get("step")
        if not (isinstance(step, int) and not isinstance(step, bool)):
            step = sum(1 for m in messages if m["role"] == "assistant")
        meta = _scalar_meta(record, self.RECORD_KEYS, ctx)
        for key in ("workload_id", "client_id"):
            if isinstance(record.get(key), (str, int)):
                meta[key] = record[key]
        return [
            _make(
                ctx, session, step, messages, tools, params, response,
                agent=record.get("agent") or record.get("client_id"),
                model=record.get("model") or resp_model or req.get("model"),
                timestamp=normalize_timestamp(record.get("timestamp", created), "timestamp"),
                usage=_usage(record.get("usage")) or resp_usage,
                latency_ms=_number(record, ("latency_ms", "duration_ms"), "record"),
                cost_usd=_number(record, ("cost_usd", "cost"), "record"),
                hci=record.get("hci"),
                meta=meta,
            )
        ]

    @staticmethod
    def _prefix_session(messages: list[dict]) -> str:
        """Gateways log calls one by one; calls of one conversation share its opening turns."""
        head = []
        for m in messages:
            head.append(m)
            if m["role"] == "user":
                break
        return "prefix:" + sha256_text(canonical_json(head))[:16]

    @staticmethod
    def _response(raw: Any) -> tuple[Response, str | None, Usage | None, Any]:
        if not isinstance(raw, dict):
            raise RecordError(f"response must be an object, got {type(raw).__name__}", "missing_field")
        if raw.get("error"):
            err = raw["error"]
            msg = err.get("message") if isinstance(err, dict) else err
            raise RecordError(f"the logged call failed: {str(msg)[:200]}", "failed_call")
        if "choices" in raw:
            choices = raw["choices"]
            if not isinstance(choices, list) or not choices:
                raise RecordError("response.choices is empty", "missing_field")
            choice = choices[0]
            if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
                raise RecordError("response.choices[0].message is missing", "missing_field")
            msg = normalize_message({"role": "assistant", **choice["message"]}, "response.choices[0].message")
            finish = choice.get("finish_reason") if isinstance(choice.get("finish_reason"), str) else None
        elif raw.get("role") in ("assistant", "agent") or "content" in raw or "tool_calls" in raw:
            msg = normalize_message({"role": "assistant", **raw}, "response")
            finish = None
        else:
            raise RecordError("response has neither choices nor an assistant message", "missing_field")
        if msg["role"] != "assistant":
            raise RecordError(f"response message has role {msg['role']!r}, expected assistant", "unknown_role")
        response = response_from_message(msg, finish)
        if response.content is None and not response.tool_calls:
            raise RecordError("response has neither content nor tool calls", "empty_response")
        model = raw.get("model") if isinstance(raw.get("model"), str) else None
        return response, model, _usage(raw.get("usage")), raw.get("created")


# --------------------------------------------------------------------------- 2. trajectories


@log_formats.register("trajectory")
class TrajectoryFormat(LogFormat):
    """Whole conversations; every assistant message is one call whose prompt is all messages before it.

    The message list sits under messages / traj / conversation / history (or the record is the
    list). Conversation-level fields (ids, reward, trial ...) go to `meta`.
    """

    name = "trajectory"
    description = "JSON array or JSONL of conversations (messages/traj/conversation/history)"

    def _message_list(self, record: Any) -> tuple[str | None, Any]:
        if isinstance(record, list):
            return None, record
        if isinstance(record, dict):
            for key in MESSAGE_LIST_KEYS:
                if isinstance(record.get(key), list):
                    return key, record[key]
        return None, None

    def sniff(self, record: Any) -> bool:
        _, msgs = self._message_list(record)
        return bool(msgs) and isinstance(msgs[0], dict) and ("role" in msgs[0] or "from" in msgs[0])

    def targets(self, raw_messages: list, index: int) -> bool:
        """Whether the assistant message at `index` is an LLM call worth keeping."""
        return True

    def parse(self, record: Any, ctx: ParseContext) -> list[Invocation]:
        key, raw_messages = self._message_list(record)
        if raw_messages is None:
            raise RecordError(f"no message list (looked for {', '.join(MESSAGE_LIST_KEYS)})", "missing_field")
        where = key or "conversation"
        messages = _messages(raw_messages, where)
        conv = record if isinstance(record, dict) else {}
        tools = _normalize_tools(conv.get("tools", conv.get("functions")), "tools")
        meta = _scalar_meta(conv, {key or "", "tools", "functions", "model", "agent"}, ctx)
        session = _session_from(conv) or "conv:" + sha256_text(canonical_json(messages))[:16]
        params = {k: conv[k] for k in KEPT_PARAMS if k in conv}
        model = conv.get("model") if isinstance(conv.get("model"), str) else None
        agent = conv.get("agent") if isinstance(conv.get("agent"), str) else None
        out, step = [], 0
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            if not self.targets(raw_messages, i):
                ctx.drop("not_a_target")
                continue
            response = response_from_message(msg)
            if response.content is None and not response.tool_calls:
                ctx.drop("empty_response")
                continue
            loc = f"{ctx.locator} message {i}"
            out.append(_make(ctx, session, step, messages[:i], tools, params, response, loc,
                             model=model, agent=agent, meta=meta))
            step += 1
        if not out:
            raise RecordError("conversation has no assistant message with content or tool calls", "no_calls")
        return out


# --------------------------------------------------------------------------- 3. OpenAI fine-tuning


@log_formats.register("openai-finetune")
class OpenAIFinetuneFormat(TrajectoryFormat):
    """OpenAI fine-tuning chat JSONL: {"messages": [...], "tools": [...]}; `weight: 0` marks non-targets."""

    name = "openai-finetune"
    description = 'OpenAI fine-tuning JSONL {"messages": [...], "tools": [...]}'
    KEYS = {"messages", "tools", "parallel_tool_calls", "functions"}

    def sniff(self, record: Any) -> bool:
        return (isinstance(record, dict) and isinstance(record.get("messages"), list)
                and set(record) <= self.KEYS and super().sniff(record))

    def targets(self, raw_messages: list, index: int) -> bool:
        raw = raw_messages[index]
        return not (isinstance(raw, dict) and raw.get("weight") == 0)


DETECTION_ORDER = ("request-response", "openai-finetune", "trajectory")


def detect_format(samples: list[Any]) -> str | None:
    """The first format (most specific first) that matches most of the sample records."""
    if not samples:
        return None
    names = [n for n in DETECTION_ORDER if n in log_formats] + [n for n in log_formats.names() if n not in DETECTION_ORDER]
    for name in names:
        fmt = get_format(name)
        hits = sum(1 for s in samples if fmt.sniff(s))
        if hits * 2 > len(samples):
            return name
    return None


__all__ = ["LogFormat", "ParseContext", "log_formats", "get_format", "detect_format"]
