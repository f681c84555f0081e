"""Text actions: agents that act by writing plain text (`GET url?…`, `POST url {json}`, `FINISH([…])`).

A rule maps an assistant message whose last lines match it to a tool call (text before the
action stays the message content), so `cluster`, `evaluate` and `serve` treat those actions as
the tool calls they are. A rule applies only when the action parses completely (a JSON body or
argument must be valid JSON), and rendering the tool call back gives the same action; that text
is what `serve` sends to an agent that acts in text.

Built in: `http` (METHOD url [json body]) and `call` (NAME(json)). Users declare their own in
`collect.text_actions` as {name, pattern, tool, arguments}: a regex with named groups, the tool
name (literal or `{group}`), and how the `args` group is read (json / query / text).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from slmconvert.errors import ConfigError

HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD")
_MAX_ACTION_CHARS = 20_000


@dataclass(frozen=True)
class TextActionRule:
    name: str
    pattern: re.Pattern
    tool: str  # literal name, or "{group}"
    arguments: str = "json"  # how the `args` group is read: json | query | text
    builtin: bool = False
    render_template: str | None = field(default=None, compare=False)

    def tool_name(self, m: re.Match) -> str:
        return self.tool.format(**{k: v or "" for k, v in m.groupdict().items()})


def _http_args(url: str, body: str | None) -> dict[str, Any]:
    args: dict[str, Any] = {}
    base, sep, query = url.partition("?")
    parts = [p.partition("=") for p in query.split("&")] if sep else []
    keys = [k for k, _, _ in parts]
    if sep and all(eq for _, eq, _ in parts) and len(set(keys)) == len(keys) and all(keys):
        args["url"] = base
        args["query"] = {k: v for k, _, v in parts}
    else:
        args["url"] = url
    if body is not None:
        try:
            args["body"] = json.loads(body)
        except json.JSONDecodeError:
            args["body"] = body
    return args


def _render_http(name: str, args: dict[str, Any]) -> str | None:
    url = args.get("url")
    if not isinstance(url, str):
        return None
    query = args.get("query")
    if isinstance(query, dict) and query:
        url += "?" + "&".join(f"{k}={v}" for k, v in query.items())
    text = f"{name} {url}"
    if "body" in args:
        body = args["body"]
        text += " " + (body if isinstance(body, str) else json.dumps(body, ensure_ascii=False))
    return text


def _render_call(name: str, args: dict[str, Any]) -> str:
    if set(args) == {"args"}:
        inner = args["args"]
        return f"{name}({inner if isinstance(inner, str) else json.dumps(inner, ensure_ascii=False)})"
    return f"{name}({json.dumps(args, ensure_ascii=False)})" if args else f"{name}()"


BUILTIN = {
    "http": TextActionRule(
        "http", re.compile(r"(?P<method>" + "|".join(HTTP_METHODS) + r")[ \t]+(?P<url>\S+)(?:[ \t]+(?P<body>[\[{].*))?", re.S),
        "{method}", "http", builtin=True),
    "call": TextActionRule(
        "call", re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)\((?P<args>(?:[\[{\"].*|[-\d].*|true|false|null)?)\)", re.S),
        "{name}", "json", builtin=True),
}
DEFAULT_RULES = ("http", "call")


def _read_args(rule: TextActionRule, m: re.Match) -> dict[str, Any] | None:
    groups = m.groupdict()
    if rule.arguments == "http":
        return _http_args(groups["url"], groups.get("body"))
    raw = groups.get("args")
    if raw is None:
        return {k: v for k, v in groups.items() if v is not None and k not in ("name", "tool", "method")}
    raw = raw.strip()
    if rule.arguments == "text":
        return {"args": raw}
    if rule.arguments == "query":
        return _http_args("?" + raw, None).get("query") or {"args": raw}
    if raw == "":
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return None if rule.builtin else {"args": raw}
    return value if isinstance(value, dict) else {"args": value}


def render(rule: TextActionRule, name: str, args: dict[str, Any]) -> str | None:
    """The text form of a tool call under `rule` (what the agent would have written)."""
    if rule.render_template is not None:
        try:
            return rule.render_template.format(tool=name, **{k: v if isinstance(v, str) else json.dumps(v) for k, v in args.items()})
        except (KeyError, IndexError, ValueError):
            return None
    if rule.arguments == "http":
        return _render_http(name, args)
    return _render_call(name, args)


def _candidates(text: str) -> Iterable[tuple[str, str]]:
    """(prefix, action) splits of a message: the whole message, then from each later line start."""
    yield "", text
    for m in re.finditer(r"\n", text):
        yield text[: m.end()], text[m.end():]


def match(text: str, rules: Iterable[TextActionRule]) -> tuple[TextActionRule, str, dict[str, Any], str | None] | None:
    """(rule, tool name, arguments, leading content) when the message ends in an action, exactly."""
    if not text or len(text) > _MAX_ACTION_CHARS:
        return None
    stripped = text.strip()
    rules = list(rules)
    for prefix, action in _candidates(stripped):
        for rule in rules:
            m = rule.pattern.fullmatch(action)
            if not m:
                continue
            name = rule.tool_name(m)
            args = _read_args(rule, m)
            if not name or args is None or render(rule, name, args) is None:
                continue
            return rule, name, args, prefix.rstrip("\n") or None
    return None


def load_rules(spec: Iterable[Any]) -> list[TextActionRule]:
    """Rules from `collect.text_actions`: built-in names, or {name, pattern, tool, arguments, render}.
    Every bad entry is reported at once, each with its key path."""
    rules, problems = [], []
    for i, item in enumerate(spec):
        where = f"collect.text_actions[{i}]"
        if isinstance(item, str):
            if item not in BUILTIN:
                problems.append(f"{where}: unknown built-in text action {item!r} (known: {', '.join(BUILTIN)})")
            else:
                rules.append(BUILTIN[item])
            continue
        if not isinstance(item, dict) or not isinstance(item.get("pattern"), str):
            problems.append(f"{where}: a text action is a built-in name or an object with at least 'pattern' (a regex)")
            continue
        unknown = set(item) - {"name", "pattern", "tool", "arguments", "render"}
        if unknown:
            problems.append(f"{where}: unknown key(s) {sorted(unknown)} (known: name, pattern, tool, arguments, render)")
        try:
            pattern = re.compile(item["pattern"], re.S)
        except re.error as e:
            problems.append(f"{where}.pattern: not a valid regular expression ({e})")
            continue
        tool = item.get("tool") or ("{tool}" if "tool" in pattern.groupindex else None)
        if not tool:
            problems.append(f"{where}: say which tool the action calls: 'tool: NAME', or a (?P<tool>…) group in the pattern")
        mode = item.get("arguments", "json")
        if mode not in ("json", "query", "text", "http"):
            problems.append(f"{where}.arguments: must be one of json, query, text, http; got {mode!r}")
        if tool and not unknown and mode in ("json", "query", "text", "http"):
            rules.append(TextActionRule(item.get("name") or f"rule{i}", pattern, tool, mode, render_template=item.get("render")))
    if problems:
        raise ConfigError("collect.text_actions", problems)
    return rules


def read_actions(messages: list[dict], declared: list[TextActionRule], builtin: list[TextActionRule],
                 seen: dict | None = None) -> list[dict]:
    """Text actions of a conversation as tool calls: declared rules always; built-in shapes only where the
    conversation has no structured tool calls (an agent with real tool calls writes none in text).
    Collect and serve read a conversation through this one function."""
    rules = list(declared)
    if builtin and not any(m.get("tool_calls") for m in messages):
        rules += builtin
    return apply_to_messages(messages, rules, seen) if rules else messages


def apply_to_messages(messages: list[dict], rules: list[TextActionRule], seen: dict | None = None) -> list[dict]:
    """Assistant messages of the prompt that end in a text action get it as a tool call."""
    return [apply_to_message(m, rules, seen) if m.get("role") == "assistant" else m for m in messages]


def apply_to_message(msg: dict, rules: list[TextActionRule], seen: dict | None = None) -> dict:
    if msg.get("tool_calls") or not isinstance(msg.get("content"), str):
        return msg
    hit = match(msg["content"], rules)
    if hit is None:
        return msg
    rule, name, args, content = hit
    if seen is not None:
        seen.setdefault(rule.name, {}).setdefault(name, 0)
        seen[rule.name][name] += 1
    out = {k: v for k, v in msg.items() if k != "content"}
    out["content"] = content
    out["tool_calls"] = [{"type": "function", "function": {"name": name, "arguments": args}}]
    return out


def as_text(content: str | None, calls: list[tuple[str, dict]], rules: list[TextActionRule],
            tools_of_rule: dict[str, Iterable[str]]) -> str | None:
    """Tool calls rendered back into the text an agent that acts in text expects; None when a call has no rule.
    `tools_of_rule`: the tools each rule produced in the log (collect's manifest `text_actions`)."""
    parts = [content] if content else []
    by_name = {}
    for rule in rules:
        for name in tools_of_rule.get(rule.name, []):
            by_name.setdefault(name, rule)
    for name, args in calls:
        rule = by_name.get(name)
        text = render(rule, name, args) if rule is not None else None
        if text is None:
            return None
        parts.append(text)
    return "\n".join(parts)
