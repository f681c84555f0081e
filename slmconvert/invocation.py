"""The data model shared by every stage: one Invocation is one LLM call.

OpenAI chat format is the lingua franca. Readers map every log format into it with
`normalize_message` / `normalize_tool_call`; a record that cannot be mapped raises
`RecordError`, whose message becomes the quarantine reason.

Tool-call arguments are always a parsed JSON object (a dict), in the response and in the
assistant messages of the prompt alike.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from slmconvert.io import canonical_json, sha256_text

ROLE_ALIASES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "human": "user",
    "customer": "user",
    "assistant": "assistant",
    "agent": "assistant",
    "ai": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "tool": "tool",
    "function": "tool",
    "ipython": "tool",
    "chain": "tool",  # NeMo Agent Toolkit: the output of a chain step fed back to the model
}


def call_parts(tc: Any) -> tuple[str | None, Any]:
    """A chat message's tool call as (name, arguments), in the OpenAI form (`{"function": {...}}`) or bare;
    arguments parsed where they are a JSON string (as the API sends them), as they are otherwise (as a
    workspace stores them, or text that is not JSON). (None, None) for what is not a call."""
    fn = tc.get("function", tc) if isinstance(tc, dict) else None
    if not isinstance(fn, dict):
        return None, None
    name, args = fn.get("name"), fn.get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            pass
    return (name if isinstance(name, str) else None), args


class RecordError(ValueError):
    """One log record cannot be mapped to invocations. The message is the quarantine reason."""

    def __init__(self, reason: str, code: str = "malformed_record"):
        super().__init__(reason)
        self.reason = reason
        self.code = code


@dataclass(slots=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str | None = None


@dataclass(slots=True)
class Request:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    # "logged" (the log carried them), "inferred" (from calls seen), "file" (--tools) or None.
    tools_source: str | None = None


@dataclass(slots=True)
class Response:
    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass(slots=True)
class Usage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass(slots=True)
class Source:
    format: str
    path: str
    locator: str  # "line 12", "index 3", "index 3 message 7", a span id ...


@dataclass(slots=True)
class Invocation:
    id: str
    source: Source
    session_id: str
    step: int
    request: Request
    response: Response
    agent: str | None = None
    timestamp: str | None = None
    model: str | None = None
    usage: Usage | None = None
    latency_ms: float | None = None
    cost_usd: float | None = None
    hci: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_tool_call(self) -> bool:
        return bool(self.response.tool_calls)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Invocation":
        req = d["request"]
        resp = d["response"]
        usage = d.get("usage")
        return Invocation(
            id=d["id"],
            source=Source(**d["source"]),
            session_id=d["session_id"],
            step=d["step"],
            request=Request(
                messages=req["messages"],
                tools=req.get("tools"),
                params=req.get("params") or {},
                tools_source=req.get("tools_source"),
            ),
            response=Response(
                content=resp.get("content"),
                tool_calls=[ToolCall(**tc) for tc in resp.get("tool_calls") or []],
                finish_reason=resp.get("finish_reason"),
            ),
            agent=d.get("agent"),
            timestamp=d.get("timestamp"),
            model=d.get("model"),
            usage=Usage(**usage) if usage else None,
            latency_ms=d.get("latency_ms"),
            cost_usd=d.get("cost_usd"),
            hci=bool(d.get("hci", False)),
            meta=d.get("meta") or {},
        )


# --------------------------------------------------------------------------- normalisation


def _content_to_text(content: Any, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, dict) and part.get("type") in {"image_url", "input_image", "image", "input_audio", "file"}:
                continue  # non-text parts carry no text to learn from; the text parts still count
            else:
                raise RecordError(f"{where}: content part {i} is neither text nor a known media part")
        return "".join(parts)
    raise RecordError(f"{where}: content must be a string, a list of parts or null, got {type(content).__name__}")


def parse_arguments(args: Any, where: str) -> dict[str, Any]:
    """Tool-call arguments as a dict. Logs carry them as a JSON string (OpenAI) or an object."""
    if args is None or args == "":
        return {}
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            raise RecordError(f"{where}: arguments are not valid JSON ({e.msg} at char {e.pos})", "invalid_tool_arguments") from None
    if not isinstance(args, dict):
        raise RecordError(f"{where}: arguments must be a JSON object, got {type(args).__name__}", "invalid_tool_arguments")
    return args


def normalize_tool_call(raw: Any, where: str) -> ToolCall:
    if not isinstance(raw, dict):
        raise RecordError(f"{where}: a tool call must be an object, got {type(raw).__name__}")
    fn = raw.get("function") if isinstance(raw.get("function"), dict) else raw
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise RecordError(f"{where}: tool call has no function name")
    args = fn.get("arguments", fn.get("args", fn.get("input", fn.get("parameters"))))
    call_id = raw.get("id")
    return ToolCall(name=name, arguments=parse_arguments(args, f"{where} ({name})"), id=call_id if isinstance(call_id, str) else None)


def tool_call_message_form(tc: ToolCall) -> dict[str, Any]:
    """The OpenAI message form of a tool call, with parsed arguments."""
    out: dict[str, Any] = {"type": "function", "function": {"name": tc.name, "arguments": tc.arguments}}
    if tc.id:
        out["id"] = tc.id
    return out


def normalize_role(raw_role: Any, where: str) -> str:
    if not isinstance(raw_role, str):
        raise RecordError(f"{where}: message has no role", "unknown_role")
    role = ROLE_ALIASES.get(raw_role.strip().lower())
    if role is None:
        known = ", ".join(sorted(set(ROLE_ALIASES)))
        raise RecordError(f"{where}: unknown role {raw_role!r} (known: {known})", "unknown_role")
    return role


def normalize_message(raw: Any, where: str) -> dict[str, Any]:
    """Map one chat message of any common shape to an OpenAI chat message with parsed tool arguments."""
    if not isinstance(raw, dict):
        raise RecordError(f"{where}: a message must be an object, got {type(raw).__name__}")
    role = normalize_role(raw.get("role", raw.get("from")), where)
    content = _content_to_text(raw.get("content", raw.get("value")), where)
    msg: dict[str, Any] = {"role": role, "content": content}
    raw_calls = raw.get("tool_calls")
    if raw_calls is None and isinstance(raw.get("function_call"), dict):  # pre-"tools" OpenAI API
        raw_calls = [raw["function_call"]]
    if raw_calls:
        if role != "assistant":
            raise RecordError(f"{where}: a {role} message carries tool calls")
        if not isinstance(raw_calls, list):
            raise RecordError(f"{where}: tool_calls must be a list")
        calls = [normalize_tool_call(c, f"{where} tool call {i}") for i, c in enumerate(raw_calls)]
        msg["tool_calls"] = [tool_call_message_form(c) for c in calls]
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if isinstance(raw.get(key), str):
                msg[key] = raw[key]
    elif isinstance(raw.get("name"), str):
        msg["name"] = raw["name"]
    return msg


def response_from_message(msg: dict[str, Any], finish_reason: str | None = None) -> Response:
    calls = [
        ToolCall(name=c["function"]["name"], arguments=c["function"]["arguments"], id=c.get("id"))
        for c in msg.get("tool_calls") or []
    ]
    if finish_reason is None:
        finish_reason = "tool_calls" if calls else "stop"
    return Response(content=msg.get("content"), tool_calls=calls, finish_reason=finish_reason)


def message_id(msg: dict[str, Any]) -> str:
    return sha256_text(canonical_json(msg))[:24]


def invocation_id(session_id: str, message_ids: list[str], tools: Any, params: dict, response: Response) -> str:
    """sha256 of the canonical request and response, within its session.

    The session is part of the key: two conversations that happen to open with the same
    words are two real calls (they count towards traffic and cost), while the same record
    read twice, from one file or from two overlapping logs, is one.
    """
    resp = {
        "content": response.content,
        "tool_calls": [{"name": c.name, "arguments": c.arguments} for c in response.tool_calls],
    }
    payload = {"session": session_id, "messages": message_ids, "tools": tools, "params": params, "response": resp}
    return sha256_text(canonical_json(payload))


def normalize_timestamp(value: Any, where: str) -> str | None:
    """UTC ISO-8601, from epoch seconds/milliseconds or any ISO-8601 string."""
    if value is None or value == "":
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, (int, float)):
            seconds = value / 1000 if value > 1e11 else value
            dt = datetime.fromtimestamp(seconds, tz=timezone.utc)
        elif isinstance(value, str):
            dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=timezone.utc)
        else:
            raise TypeError
    except (TypeError, ValueError, OverflowError, OSError):
        raise RecordError(f"{where}: timestamp {value!r} is neither epoch seconds nor ISO-8601", "bad_timestamp") from None
    return dt.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
