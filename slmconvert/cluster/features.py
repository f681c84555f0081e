"""What cluster looks at in an invocation.

Request features (a call site must be recognisable from the request alone, so that a router
can map live traffic to it): the instruction template (the system prompt, or the head of the
first user message when there is none) with its variable parts masked, and the tool names.

Action features (a task is what the agent was asked to do *and* what it did): the tool name
and argument shape of a tool call, or the reply text with the turn that prompted it.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

from slmconvert.invocation import Invocation

# Variable parts of a template: ids, e-mails, URLs, dates, numbers. Order matters (most specific first).
_MASKS = [
    (re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", re.IGNORECASE), "<ID>"),
    (re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b"), "<EMAIL>"),
    (re.compile(r"\bhttps?://\S+"), "<URL>"),
    (re.compile(r"\b\d{4}-\d{2}-\d{2}(?:[T ][\d:.]+(?:Z|[+-]\d{2}:?\d{2})?)?\b"), "<DATE>"),
    (re.compile(r"\b(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)[a-z]*\.? \d{1,2}(?:st|nd|rd|th)?,? \d{4}\b"), "<DATE>"),
    (re.compile(r"\b(?:Mon|Tues|Wednes|Thurs|Fri|Satur|Sun)day\b"), "<DAY>"),
    (re.compile(r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{12,}\b", re.IGNORECASE), "<ID>"),
    (re.compile(r"\d+(?:[.,:]\d+)*"), "<N>"),
]
_SPACES = re.compile(r"[ \t]+")
FIRST_USER_HEAD = 300  # chars of the first user message that stand for the template when there is no system prompt


@functools.lru_cache(maxsize=4096)  # a system prompt repeats in every call of its agent: mask it once
def mask_variables(text: str) -> str:
    for pattern, token in _MASKS:
        text = pattern.sub(token, text)
    return _SPACES.sub(" ", text).strip()


def _text(msg: dict[str, Any]) -> str:
    content = msg.get("content")
    return content if isinstance(content, str) else ("" if content is None else json.dumps(content, ensure_ascii=False))


def request_template(messages: list[dict[str, Any]]) -> str:
    """The instruction template of a request, variables masked."""
    system = "\n".join(_text(m) for m in messages if m.get("role") == "system").strip()
    if system:
        return mask_variables(system)
    first_user = next((_text(m) for m in messages if m.get("role") == "user"), "")
    return "[no system prompt] " + mask_variables(first_user[:FIRST_USER_HEAD])


def tool_names(tools: list[dict[str, Any]] | None) -> list[str]:
    names = []
    for t in tools or []:
        fn = t.get("function", t) if isinstance(t, dict) else {}
        name = fn.get("name") if isinstance(fn, dict) else None
        if name:
            names.append(str(name))
    return sorted(set(names))


def request_signature(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> tuple[str, tuple[str, ...]]:
    return request_template(messages), tuple(tool_names(tools))


def prompting_turn(messages: list[dict[str, Any]], limit: int = 600) -> str:
    """The trailing non-assistant messages of the prompt (the user turn or tool results that prompted the call)."""
    tail = []
    for m in reversed(messages):
        if m.get("role") in ("assistant", "system"):
            break
        tail.append(f"{m.get('role')}: {_text(m)[:limit]}")
    return "\n".join(reversed(tail))[: 2 * limit]


def action_text(inv: Invocation, limit: int = 600) -> str:
    if inv.response.tool_calls:
        return "\n".join(f"call {c.name}({json.dumps(c.arguments, ensure_ascii=False, sort_keys=True)[:limit]})"
                         for c in inv.response.tool_calls)
    return (inv.response.content or "")[:limit]


def invocation_text(inv: Invocation) -> str:
    """What is embedded for an invocation: what the agent did, then the turn that prompted it.

    The action comes first because the encoder truncates (MiniLM reads 256 word pieces): a long
    tool result in the prompting turn must not crowd the reply out.
    """
    return f"assistant: {action_text(inv, 500)}\n{prompting_turn(inv.request.messages, 300)}"


def tool_action_key(inv: Invocation) -> tuple[str, tuple[str, ...]] | None:
    """(tool name(s), argument shape) of a tool-call response; None for a text reply."""
    calls = inv.response.tool_calls
    if not calls:
        return None
    names = "+".join(sorted({c.name for c in calls}))
    shape = tuple(sorted({k for c in calls for k in c.arguments}))
    return names, shape


def estimate_tokens(text_chars: int) -> int:
    """A rough token count (~4 characters per token) for logs without usage figures."""
    return (text_chars + 3) // 4


def prompt_chars(inv: Invocation) -> int:
    n = 0
    for m in inv.request.messages:
        n += len(_text(m))
        for c in m.get("tool_calls") or []:
            n += len(json.dumps(c, ensure_ascii=False))
    return n


def completion_chars(inv: Invocation) -> int:
    return len(inv.response.content or "") + sum(len(json.dumps(c.arguments, ensure_ascii=False)) + len(c.name)
                                                 for c in inv.response.tool_calls)
