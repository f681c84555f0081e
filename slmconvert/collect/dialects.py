"""Message and body dialects: what other APIs and tracing tools call a chat message, mapped to one shape.

Every reader hands its message lists here, so a conversation logged through the Anthropic
Messages API, the OpenAI Responses API, LangChain (serialised or as dicts), OpenTelemetry
GenAI `parts` or OpenAI chat completions becomes the same list of OpenAI chat messages, and
the same logged call gives the same invocation whichever tool wrote it down.

- `chat_messages(raw)`: a message list of any of these dialects → OpenAI chat message dicts
  (not yet validated; `normalize_message` does that).
- `request_body(body)`: a request body (chat completions, Anthropic Messages, Responses) →
  (messages, tools, params).
- `answer_body(raw)`: a logged answer (chat.completion, Anthropic message, Responses
  response, an assistant message, LangChain AIMessage, a bare string) → (assistant message,
  finish reason, model, usage, created).
"""

from __future__ import annotations

import json
from typing import Any

from slmconvert.invocation import RecordError, Usage

# LangChain message classes and `type` names → chat roles.
LANGCHAIN_TYPES = {
    "human": "user", "humanmessage": "user", "humanmessagechunk": "user",
    "ai": "assistant", "aimessage": "assistant", "aimessagechunk": "assistant",
    "system": "system", "systemmessage": "system", "systemmessagechunk": "system",
    "tool": "tool", "toolmessage": "tool", "toolmessagechunk": "tool",
    "function": "tool", "functionmessage": "tool", "functionmessagechunk": "tool",
    "chat": None, "chatmessage": None, "chatmessagechunk": None,  # role in the message itself
}
# Anthropic stop reasons → chat-completions finish reasons.
STOP_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "tool_use": "tool_calls", "max_tokens": "length",
                "pause_turn": "stop", "refusal": "content_filter", "tool_call": "tool_calls"}
# Blocks and items that hold no text or action to learn from (model-internal reasoning, media).
SKIPPED_BLOCKS = {"thinking", "redacted_thinking", "reasoning", "image", "document", "input_image", "input_file",
                  "input_audio", "image_url", "file", "blob", "uri", "server_tool_use", "web_search_tool_result"}
# The text a content block carries, by block type.
TEXT_BLOCKS = {"text", "input_text", "output_text", "refusal"}


def maybe_json(value: Any) -> Any:
    """A JSON document stored as a string (tracing attributes, gateway bodies) decoded; anything else as is."""
    if isinstance(value, str) and value[:1] in ("{", "["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _kind(obj: dict) -> str | None:
    """The `type` of a block, item or message when it is a string (anything else names no type)."""
    kind = obj.get("type")
    return kind if isinstance(kind, str) else None


def _block_text(block: dict) -> str | None:
    for key in ("text", "content"):
        if isinstance(block.get(key), str):
            return block[key]
    return None


def _text_of(content: Any, where: str) -> str | None:
    """The text of a content value: a string, or the text blocks of a list (media and reasoning skipped)."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, block in enumerate(content):
            if isinstance(block, str):
                parts.append(block)
            elif isinstance(block, dict):
                kind = _kind(block)
                if kind in SKIPPED_BLOCKS:
                    continue
                text = _block_text(block)
                if text is None:
                    raise RecordError(f"{where}: content block {i} ({kind!r}) has no text")
                parts.append(text)
            else:
                raise RecordError(f"{where}: content block {i} must be a string or an object")
        return "".join(parts)
    if isinstance(content, dict):
        return json.dumps(content, ensure_ascii=False, sort_keys=True)
    return str(content)


def _call(call_id: Any, name: Any, arguments: Any) -> dict:
    out: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": maybe_json(arguments) if arguments is not None else {}}}
    if isinstance(call_id, str) and call_id:
        out["id"] = call_id
    return out


def _from_blocks(role: str, blocks: list, extra: dict, where: str) -> list[dict]:
    """An Anthropic- or OTel-style message whose content is typed blocks: tool uses become tool calls,
    tool results become tool messages (one per result, before any text of the same turn)."""
    texts: list[str] = []
    calls: list[dict] = []
    results: list[dict] = []
    for i, b in enumerate(blocks):
        if isinstance(b, str):
            texts.append(b)
            continue
        if not isinstance(b, dict):
            raise RecordError(f"{where}: content block {i} must be an object")
        kind = _kind(b)
        if kind in ("tool_use", "tool_call", "function_call"):
            calls.append(_call(b.get("id", b.get("call_id")), b.get("name"), b.get("input", b.get("arguments"))))
        elif kind in ("tool_result", "tool_call_response", "function_call_output"):
            body = b.get("content", b.get("response", b.get("result", b.get("output"))))
            results.append({"role": "tool", "tool_call_id": b.get("tool_use_id", b.get("id", b.get("call_id"))),
                            "content": _text_of(body, f"{where} block {i}") if not isinstance(body, (int, float, bool)) else json.dumps(body)})
        elif kind in SKIPPED_BLOCKS:
            continue
        else:
            text = _block_text(b)
            if text is None:
                raise RecordError(f"{where}: content block {i} ({kind!r}) is neither text, a tool call nor a tool result")
            texts.append(text)
    out = list(results)
    if texts or calls or not results:
        msg = {**extra, "role": role, "content": "".join(texts) if texts else None}
        if calls:
            msg["tool_calls"] = [*(extra.get("tool_calls") or []), *calls]
        out.append(msg)
    return out


def _has_blocks(content: Any) -> bool:
    return isinstance(content, list) and any(
        isinstance(b, dict) and _kind(b) in ("tool_use", "tool_result", "tool_call", "tool_call_response") for b in content)


def _langchain(m: dict, where: str) -> dict | None:
    """A LangChain message, serialised (`{"lc": 1, "id": [..., "AIMessage"], "kwargs": {...}}`) or as a dict
    (`{"type": "ai", "data": {...}}` or `{"type": "ai", "content": ...}`); None when `m` is not one."""
    if m.get("lc") == 1 and isinstance(m.get("id"), list) and m["id"] and isinstance(m.get("kwargs"), dict):
        cls, body = str(m["id"][-1]).lower(), m["kwargs"]
    elif isinstance(m.get("type"), str) and m["type"].lower() in LANGCHAIN_TYPES and "role" not in m:
        cls = m["type"].lower()
        body = m["data"] if isinstance(m.get("data"), dict) else m
    else:
        return None
    if cls not in LANGCHAIN_TYPES:
        raise RecordError(f"{where}: unknown LangChain message class {m['id'][-1] if 'lc' in m else m['type']!r}", "unknown_role")
    role = LANGCHAIN_TYPES[cls] or body.get("role")
    out: dict[str, Any] = {"role": role, "content": body.get("content")}
    lc_calls = body.get("tool_calls")
    if isinstance(lc_calls, list) and lc_calls:  # LangChain's own form: {name, args, id}
        out["tool_calls"] = [_call(c.get("id"), c.get("name"), c.get("args", c.get("arguments"))) if isinstance(c, dict) and "function" not in c
                             else c for c in lc_calls]
    else:
        extra = body.get("additional_kwargs") if isinstance(body.get("additional_kwargs"), dict) else {}
        if isinstance(extra.get("tool_calls"), list) and extra["tool_calls"]:
            out["tool_calls"] = extra["tool_calls"]
        elif isinstance(extra.get("function_call"), dict):
            out["function_call"] = extra["function_call"]
    if out.get("tool_calls") and out["content"] in ("", []):
        out["content"] = None  # LangChain writes "" beside tool calls; chat completions writes null
    if role == "tool":
        if isinstance(body.get("tool_call_id"), str):
            out["tool_call_id"] = body["tool_call_id"]
        if isinstance(body.get("name"), str):
            out["name"] = body["name"]
    return out


def _openinference_like(m: dict) -> dict:
    """`{"message": {...}}` wrappers (OpenInference, some exporters) unwrapped."""
    inner = m.get("message")
    return inner if isinstance(inner, dict) and len(m) == 1 else m


def chat_messages(raw: list, where: str) -> list[Any]:
    """Any dialect's message list as OpenAI chat messages (non-dicts passed through for the validator to name)."""
    out: list[Any] = []
    for i, m in enumerate(raw):
        w = f"{where}[{i}]"
        if not isinstance(m, dict):
            out.append(m)
            continue
        m = _openinference_like(m)
        lc = _langchain(m, w)
        if lc is not None:
            m = lc
        kind = _kind(m)
        if kind == "function_call" and "role" not in m:  # Responses API item: one call of an assistant turn
            call = _call(m.get("call_id", m.get("id")), m.get("name"), m.get("arguments"))
            last = out[-1] if out and isinstance(out[-1], dict) else None
            if last is not None and last.get("role") == "assistant" and last.get("_turn"):
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call], "_turn": True})
            continue
        if kind == "function_call_output" and "role" not in m:
            output = m.get("output")
            out.append({"role": "tool", "tool_call_id": m.get("call_id"),
                        "content": output if isinstance(output, str) else _text_of(output, w) if isinstance(output, list)
                        else json.dumps(output, ensure_ascii=False)})
            continue
        if kind in SKIPPED_BLOCKS and "role" not in m:  # a reasoning item between turns
            continue
        role = m.get("role", m.get("from"))
        if isinstance(m.get("parts"), list):  # OpenTelemetry GenAI: {"role", "parts": [...]}
            converted = _from_blocks(role, m["parts"], {}, w)
        elif _has_blocks(m.get("content")):
            extra = {k: v for k, v in m.items() if k in ("name", "tool_calls")}
            converted = _from_blocks(role, m["content"], extra, w)
        else:
            msg = {k: v for k, v in m.items() if k not in ("type", "id", "status")} if kind == "message" else dict(m)
            if isinstance(msg.get("content"), list):
                msg["content"] = _text_of(msg["content"], w)
            converted = [msg]
        for c in converted:
            if c.get("role") == "assistant" and kind in ("message", None) and not m.get("tool_calls"):
                c["_turn"] = True  # a Responses assistant item: function_call items that follow belong to it
            out.append(c)
    for c in out:
        if isinstance(c, dict):
            c.pop("_turn", None)
    return out


def system_text(value: Any, where: str) -> str | None:
    """Instructions given beside the messages (Anthropic `system`, Responses `instructions`,
    OTel `gen_ai.system_instructions`): a string or a list of text blocks."""
    value = maybe_json(value)
    if value is None or value == "" or value == []:
        return None
    return _text_of(value, where)


def tool_list(raw: Any) -> tuple[list | None, int]:
    """Function tools of a request (OpenAI nested, Responses / Anthropic / OTel flat), and how many
    provider built-in tools (web search, code interpreter, ...) were left out."""
    raw = maybe_json(raw)
    if not isinstance(raw, list):
        return raw, 0
    kept, builtin = [], 0
    for t in raw:
        t = maybe_json(t)
        if isinstance(t, dict) and not isinstance(t.get("function"), dict) and not isinstance(t.get("name"), str) \
                and isinstance(t.get("type"), str) and t["type"] != "function":
            builtin += 1
            continue
        if isinstance(t, dict) and isinstance(t.get("type"), str) and t["type"] not in ("function", "custom") \
                and "input_schema" not in t and "parameters" not in t and not isinstance(t.get("function"), dict):
            builtin += 1  # Anthropic server tools: {"type": "web_search_20250305", "name": "web_search"}
            continue
        kept.append(t)
    return kept, builtin


def request_body(body: dict, where: str) -> tuple[list, Any, dict, int]:
    """(messages, tools, request fields, built-in tools dropped) of a chat-completions, Anthropic
    Messages or Responses request body. The messages are still in the body's dialect (with the
    instructions as a leading system message): `chat_messages` converts them."""
    if "messages" in body:
        messages = body["messages"]
        if not isinstance(messages, list):
            raise RecordError(f"{where}.messages must be a list, got {type(messages).__name__}", "wrong_type")
        system = system_text(body.get("system"), f"{where}.system") if "system" in body else None
    elif "input" in body:
        raw = body["input"]
        if isinstance(raw, str):
            raw = [{"role": "user", "content": raw}]
        if not isinstance(raw, list):
            raise RecordError(f"{where}.input must be a string or a list of items, got {type(raw).__name__}", "wrong_type")
        messages = raw
        system = system_text(body.get("instructions"), f"{where}.instructions")
    else:
        raise RecordError(f"{where} has neither messages nor input", "missing_field")
    if system:
        messages = [{"role": "system", "content": system}, *messages]
    tools, builtin = tool_list(body.get("tools", body.get("functions")))
    return messages, tools, body, builtin


def usage_of(raw: Any) -> Usage | None:
    """Token counts under any of their common names (OpenAI, Anthropic, Langfuse, LangChain)."""
    if not isinstance(raw, dict):
        return None
    ok = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731

    def first(*keys: str) -> int | None:
        for k in keys:
            v = raw.get(k)
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            if ok(v):
                return v
        return None

    p = first("prompt_tokens", "input_tokens", "input", "promptTokens", "prompt")
    c = first("completion_tokens", "output_tokens", "output", "completionTokens", "completion")
    if p is None and c is None:
        return None
    return Usage(p, c)


def answer_body(raw: Any, where: str = "response") -> tuple[dict, str | None, str | None, Usage | None, Any]:
    """(assistant message, finish reason, model, usage, created) of a logged answer in any dialect."""
    raw = maybe_json(raw)
    if isinstance(raw, str):
        return {"role": "assistant", "content": raw}, None, None, None, None
    if isinstance(raw, list):  # a list of output messages / items (OTel output messages, Responses output)
        raw = {"output": raw}
    if not isinstance(raw, dict):
        raise RecordError(f"{where} must be an object, got {type(raw).__name__}", "missing_field")
    if raw.get("error"):
        err = raw["error"]
        msg = err.get("message") if isinstance(err, dict) else err
        raise RecordError(f"the logged call failed: {str(msg)[:200]}", "failed_call")
    model = raw.get("model") if isinstance(raw.get("model"), str) else None
    usage = usage_of(raw.get("usage")) or usage_of(raw.get("usage_metadata"))
    created = raw.get("created", raw.get("created_at"))
    if "choices" in raw:
        choices = raw["choices"]
        if not isinstance(choices, list) or not choices:
            raise RecordError(f"{where}.choices is empty", "missing_field")
        choice = choices[0]
        if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
            raise RecordError(f"{where}.choices[0].message is missing", "missing_field")
        [msg] = _one_answer([{"role": "assistant", **choice["message"]}], f"{where}.choices[0].message")
        finish = choice.get("finish_reason") if isinstance(choice.get("finish_reason"), str) else None
        return msg, finish, model, usage, created
    if isinstance(raw.get("output"), list) and "role" not in raw:  # Responses API response / output message list
        status = raw.get("status")
        if status == "failed":
            raise RecordError("the logged call failed (status: failed)", "failed_call")
        items = [x for x in raw["output"] if not (isinstance(x, dict) and _kind(x) in SKIPPED_BLOCKS)]
        if not items:
            raise RecordError(f"{where}.output holds no message or tool call", "empty_response")
        msgs = chat_messages(items, f"{where}.output")
        msgs = [m for m in msgs if isinstance(m, dict) and m.get("role") in ("assistant", "ai", "model")] or msgs
        msg = _merge_turn(msgs, f"{where}.output")
        finish = None
        if status == "incomplete":
            finish = "length"
        fin = [m.get("finish_reason") for m in raw["output"] if isinstance(m, dict) and isinstance(m.get("finish_reason"), str)]
        if fin:
            finish = STOP_REASONS.get(fin[-1], fin[-1])
        return msg, finish, model, usage, created
    if raw.get("type") == "message" and isinstance(raw.get("content"), list):  # Anthropic Messages response
        [msg] = _one_answer([{"role": raw.get("role", "assistant"), "content": raw["content"]}], where)
        stop = raw.get("stop_reason")
        return msg, STOP_REASONS.get(stop, stop) if isinstance(stop, str) else None, model, usage, created
    lc = _langchain(raw, where)
    if lc is not None:
        [msg] = _one_answer([raw], where)
        meta = (raw.get("kwargs") or raw.get("data") or raw).get("response_metadata") or {}
        finish = meta.get("finish_reason", meta.get("stop_reason")) if isinstance(meta, dict) else None
        body = raw.get("kwargs") or raw.get("data") or raw
        return msg, STOP_REASONS.get(finish, finish) if isinstance(finish, str) else None, \
            model or (meta.get("model_name") if isinstance(meta, dict) else None), usage_of(body.get("usage_metadata")) or usage, created
    if raw.get("role") in ("assistant", "agent", "ai", "model") or "content" in raw or "tool_calls" in raw or "parts" in raw:
        [msg] = _one_answer([{"role": "assistant", **raw} if "role" not in raw else raw], where)
        finish = raw.get("finish_reason") if isinstance(raw.get("finish_reason"), str) else None
        return msg, finish, model, usage, created
    raise RecordError(f"{where} has neither choices nor an assistant message", "missing_field")


def _merge_turn(msgs: list, where: str) -> dict:
    """One assistant message from the messages of one answer (text and calls written as separate items)."""
    assistants = [m for m in msgs if isinstance(m, dict)]
    if not assistants:
        raise RecordError(f"{where} holds no assistant message", "empty_response")
    if len(assistants) == 1:
        return assistants[0]
    texts = [m["content"] for m in assistants if isinstance(m.get("content"), str) and m["content"]]
    calls = [c for m in assistants for c in (m.get("tool_calls") or [])]
    out = {"role": assistants[0].get("role", "assistant"), "content": "\n".join(texts) if texts else None}
    if calls:
        out["tool_calls"] = calls
    return out


def _one_answer(raw: list, where: str) -> list[dict]:
    msgs = [m for m in chat_messages(raw, where) if isinstance(m, dict)]
    return [_merge_turn(msgs, where)]


__all__ = ["chat_messages", "request_body", "answer_body", "usage_of", "system_text", "tool_list", "maybe_json"]
