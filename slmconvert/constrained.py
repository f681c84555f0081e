"""Schema-constrained tool calls: the SLM may reply in free text, but once it opens a tool call it can
only name a tool the request offers and write arguments valid against that tool's JSON schema.

Built on xgrammar's structural tags (the grammar engine vLLM and SGLang use; a transformers logits
processor on CPU and GPU): text is free until the trigger `<tool_call>`, after which one of the
offered tools' tags must follow, `<tool_call>{"name": "<tool>", "arguments": <schema-valid JSON>}</tool_call>`,
the exact form the adapters were trained on (slmconvert.chat). A tool whose schema xgrammar cannot
compile keeps its name constrained and its arguments to any JSON object. Compiled grammars are cached (LRU)
per tool set (per request where arguments are copied, below); the compiler is built once per tokenizer.

A schema bounds a value's type, rarely its length, and a small model caught in a loop
(`"expression": "((((((…"`, a `flights` list that never closes) runs out of tokens inside the call.
`argument_bounds` reads, from the site's training calls, the longest string and the longest list the
LLM ever wrote for each argument; `bound_schema` caps free strings and lists at a margin above that
(`maxLength`, `maxItems`; the schema's own limits win), so every call the grammar allows can end. The
bounds are part of the routing policy, so `serve` decodes under the grammar evaluate verified.

Ids, dates and codes are copied, not re-generated: where the LLM's value of a string argument was one
of the request's own strings (a word-like token of its messages, or a piece of one between `@`, `/` and
`:`, such as an e-mail's local part) in at least `copy_share` of the site's training calls (at least
COPY_MIN_VALUES of them), the grammar lets the SLM write only such a token of
the request in hand that has the shape the LLM's copied values had (their length range, the character
classes all of them had, none they never had), standing where the LLM's copies stood (`request_sources`: a
role's free text, a JSON tool result's field or an object's keys there, an earlier call's argument; those
holding at least COPY_SOURCE_SHARE of the copies). A 135M model that gets the tool right still garbles a
six-character reservation id; under this it can only pick one of the request's, and not a flight number of
the same shape. A tool called too rarely in training to show this of its own (a write the LLM made
twice) whose values were all copies borrows the evidence of the site's other tools that take an argument of the
same name (`_borrow_copies`).

A lookup is not repeated. A small model whose window shows its last call and that call's result tends to
make the same call again (on tau-bench, 56 of a 135M adapter's 200 test answers repeated the call just
made, word for word, where gpt-4o repeated one of 1,164 calls in 2.7% of cases, nearly all retries of
writes). `argument_bounds` counts, per tool, how often the site's LLM called it again with the very
arguments of a call already in the conversation; a tool of one argument that it re-called in at most
`repeat_share` of its calls (COPY_MIN_VALUES calls at least) gets `#norepeat`, and for such a tool the
grammar takes the values the conversation already called it with out of that argument's enum (a copied
argument's, or the schema's own). A tool left with no value to call it with is not offered, unless no
tool would be left.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections.abc import Callable
from typing import Any

from slmconvert.invocation import ROLE_ALIASES, call_parts
from slmconvert.io import canonical_json, sha256_obj

TRIGGER = "<tool_call>"
MAX_WHITESPACE = 1  # inside a call: JSON as json.dumps writes it; a model cannot stall on spaces where a value is forbidden
UNSEEN_STRING_CHARS = 256  # cap on a free string the LLM never wrote for this argument


COPY_MIN_VALUES = 10  # training values of an argument before its copying is trusted
COPY_SOURCE_SHARE = 0.02  # a copy may come from where at least this share of the LLM's copies of the argument stood
_TOKEN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_\-.:@/+]*[A-Za-z0-9])?")
_SEPARATOR = re.compile(r"[@/:]")
_CLASSES = [(1, str.isupper), (2, str.islower), (4, str.isdigit)] + [(8 << i, c.__eq__) for i, c in enumerate("_-.:@/+")]


def _json_sources(obj: Any, prefix: str, key: str, out: dict[str, set[str]]) -> None:
    """The strings of a JSON document under `prefix:field` (its leaves) and `prefix-key:field` (the keys of an
    object in that field: payment methods keyed by their ids)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            _text_sources(str(k), f"{prefix}-key:{key}", out)
            _json_sources(v, prefix, str(k), out)
    elif isinstance(obj, list):
        for v in obj:
            _json_sources(v, prefix, key, out)
    elif isinstance(obj, (str, int, float)) and not isinstance(obj, bool):
        _text_sources(str(obj), f"{prefix}:{key}", out)


def _text_sources(text: str, source: str, out: dict[str, set[str]]) -> None:
    source = source.replace("#", "_")  # a bounds key holds it after a "#"
    for t in _TOKEN.findall(text):
        out.setdefault(t, set()).add(source)
        if _SEPARATOR.search(t):  # the pieces of an address or a path are copied too: an e-mail's local part
            for piece in _TOKEN.findall(_SEPARATOR.sub(" ", t)):
                out.setdefault(piece, set()).add(source)


def request_sources(messages: list[dict] | None) -> dict[str, set[str]]:
    """Each word-like string of a request's messages, with where it stands: `user-text`, `assistant-text` (a
    role's free text), `json:reservations` (a JSON tool result's field), `json-key:payment_methods` (the keys of
    an object there), `arg:user_id` (an earlier call's argument). A conversation's requests repeat its earlier
    messages: each message's own strings are read once (LRU) and only merged here."""
    out: dict[str, set[str]] = {}

    def merge(pairs) -> None:
        for t, src in pairs:
            have = out.get(t)
            if have is None:
                out[t] = set(src)
            else:
                have |= src

    for m in messages or []:
        if not isinstance(m, dict):
            continue
        role = ROLE_ALIASES.get(str(m.get("role")), str(m.get("role")))
        content = m.get("content")
        texts = ([content] if isinstance(content, str) else
                 [c["text"] for c in content if isinstance(c, dict) and isinstance(c.get("text"), str)] if isinstance(content, list) else [])
        for text in texts:
            merge(_content_sources(role, text))
        for call in m.get("tool_calls") or []:
            _, args = call_parts(call)
            one: dict[str, set[str]] = {}
            if isinstance(args, (dict, list)):
                _json_sources(args, "arg", "", one)
            elif isinstance(args, str):
                _text_sources(args, "arg:", one)
            merge(one.items())
    return out


@functools.lru_cache(maxsize=1024)  # a long conversation's messages; tool results of ~10 KB: ~20 MB at most
def _content_sources(role: str, text: str) -> tuple[tuple[str, frozenset[str]], ...]:
    """The strings of one message's text and where they stand (a JSON tool result by field, other text by role)."""
    out: dict[str, set[str]] = {}
    data = None
    if role == "tool" and text.lstrip()[:1] in ("{", "["):
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            data = None
    if isinstance(data, (dict, list)):
        _json_sources(data, "json", "", out)
    else:
        _text_sources(text, f"{role}-text", out)
    return tuple((t, frozenset(src)) for t, src in out.items())


def _classes(value: str) -> int:
    bits = 0
    for ch in set(value):
        for bit, test in _CLASSES:
            if test(ch):
                bits |= bit
                break
    return bits


def _walk(value: Any, path: str, out: dict[str, int], tokens: dict[str, set[str]]) -> None:
    if isinstance(value, str):
        out[path + "#chars"] = max(out.get(path + "#chars", 0), len(value))
        out[path + "#strings"] = out.get(path + "#strings", 0) + 1
        if value in tokens:  # copied: its shape is what a copy may look like
            out[path + "#copied"] = out.get(path + "#copied", 0) + 1
            out[path + "#copy_min"] = min(out.get(path + "#copy_min", len(value)), len(value))
            out[path + "#copy_max"] = max(out.get(path + "#copy_max", 0), len(value))
            bits = _classes(value)
            out[path + "#copy_need"] = out.get(path + "#copy_need", bits) & bits
            out[path + "#copy_allow"] = out.get(path + "#copy_allow", 0) | bits
            for src in tokens[value]:  # where the copied value stood in the request
                out[path + "#copy_src:" + src] = out.get(path + "#copy_src:" + src, 0) + 1
    elif isinstance(value, list):
        out[path + "#items"] = max(out.get(path + "#items", 0), len(value))
        for v in value:
            _walk(v, path + "/*", out, tokens)
    elif isinstance(value, dict):
        for k, v in value.items():
            _walk(v, f"{path}/{k}", out, tokens)


def _mark_copied(bounds: dict[str, int], copy_share: float | None) -> None:
    """`#copy` = 1 on the string paths whose values are decoded as copies (see the module's docstring)."""
    for key in [k for k in bounds if k.endswith("#strings")]:
        path, n = key[: -len("#strings")], bounds[key]
        if copy_share is not None and n >= COPY_MIN_VALUES and bounds.get(path + "#copied", 0) >= copy_share * n:
            bounds[path + "#copy"] = 1


def _borrow_copies(out: dict[str, dict[str, int]], copy_share: float) -> None:
    """A tool with too few training calls of its own (fewer than COPY_MIN_VALUES values at an argument path) whose
    values there were all copied, where the site's other tools wrote at least COPY_MIN_VALUES values at the same path
    and copied at least `copy_share` of them, is decoded as a copy too (`#copy`; `#copy_borrowed`: the other tools'
    copies it leans on), in the shape of all those copies, standing where they stood. An agent's tools that share an argument's name
    (`reservation_id`, `user_id`) pass it the same kind of value; a rarely called write then copies the id the
    frequent lookups copied, instead of inventing one. Each tool borrows from the others' own evidence, never from what
    another borrowed, so the order of the log does not matter."""
    own = {tool: dict(b) for tool, b in out.items()}
    for tool, b in out.items():
        for key in [k for k in b if k.endswith("#strings")]:
            path, n = key[: -len("#strings")], b[key]
            if n >= COPY_MIN_VALUES or b.get(path + "#copied", 0) < n:
                continue  # its own evidence decides, or it wrote a value it did not copy
            others = [o for t, o in own.items() if t != tool and o.get(path + "#strings", 0)]
            total = sum(o[path + "#strings"] for o in others)
            copied = sum(o.get(path + "#copied", 0) for o in others)
            if total < COPY_MIN_VALUES or copied < copy_share * total:
                continue
            for o in others:
                if not o.get(path + "#copied"):
                    continue
                b[path + "#copy_min"] = min(b.get(path + "#copy_min", o[path + "#copy_min"]), o[path + "#copy_min"])
                b[path + "#copy_max"] = max(b.get(path + "#copy_max", 0), o[path + "#copy_max"])
                b[path + "#copy_need"] = b.get(path + "#copy_need", o[path + "#copy_need"]) & o[path + "#copy_need"]
                b[path + "#copy_allow"] = b.get(path + "#copy_allow", 0) | o[path + "#copy_allow"]
                for k in [k for k in o if k.startswith(path + "#copy_src:")]:
                    b[k] = b.get(k, 0) + o[k]
            b[path + "#copy"], b[path + "#copy_borrowed"] = 1, copied


GRAMMAR_FORMAT = 1  # raised when the same (name, schema) specs would compile to another grammar (the tag's form, its
# whitespace): part of evaluate's generation cache key, beside each request's own specs (bounded_specs)


def copy_sources(bounds: dict[str, int], path: str) -> set[str] | None:
    """Where in a request the LLM's copies of this argument stood, in at least COPY_SOURCE_SHARE of them (None:
    bounds written before sources were counted: anywhere)."""
    prefix = path + "#copy_src:"
    counts = {k[len(prefix):]: n for k, n in bounds.items() if k.startswith(prefix)}
    if not counts:
        return None
    copies = bounds.get(path + "#copied", 0) + bounds.get(path + "#copy_borrowed", 0)
    return {src for src, n in counts.items() if n >= COPY_SOURCE_SHARE * copies}


def copy_candidates(tokens: dict[str, tuple[int, set[str]]], bounds: dict[str, int], path: str, schema: dict[str, Any]) -> list[str]:
    """The request's tokens (each with its character classes and where it stands) an argument marked `#copy` may
    take: the shape of the LLM's copies, standing where its copies stood, within the schema's own length limits."""
    lo, hi = bounds[path + "#copy_min"], bounds[path + "#copy_max"]
    lo, hi = max(1, lo - lo // 4), hi + max(1, hi // 4)  # a little room: ids of one kind vary in length
    lo = max(lo, schema.get("minLength") if isinstance(schema.get("minLength"), int) else 0)
    hi = min(hi, schema.get("maxLength") if isinstance(schema.get("maxLength"), int) else hi)
    need, allow = bounds[path + "#copy_need"], bounds[path + "#copy_allow"]
    where = copy_sources(bounds, path)
    return sorted(t for t, (c, src) in tokens.items() if lo <= len(t) <= hi and c & need == need and not c & ~allow
                  and (where is None or src & where))


def argument_bounds(invocations, copy_share: float | None = None, repeat_share: float | None = None) -> dict[str, dict[str, int]]:
    """Per tool, per argument path ("/flights/*/date#chars", "/flights#items"): the longest string / list
    the LLM wrote in these invocations' tool calls; for strings, how many it wrote and copied from the
    request, the shape of the copies, and `#copy` where copies are enforced (copy_share; None: nowhere).
    Per tool: its calls (`#calls`), those repeating a call of the conversation exactly (`#repeats`), and
    `#norepeat` where repeats are not offered (repeat_share; None: nowhere; see the module's docstring)."""
    out: dict[str, dict[str, int]] = {}
    for inv in invocations:
        calls = [c for c in inv.response.tool_calls or [] if isinstance(c.arguments, dict) and "_raw" not in c.arguments]
        tokens = request_sources(inv.request.messages) if calls else {}
        made = _made(inv.request.messages) if calls else set()
        for call in calls:
            b = out.setdefault(call.name, {})
            _walk(call.arguments, "", b, tokens)
            b["#calls"] = b.get("#calls", 0) + 1
            b["#repeats"] = b.get("#repeats", 0) + ((call.name, canonical_json(call.arguments)) in made)
    for b in out.values():
        _mark_copied(b, copy_share)
    if copy_share is not None:
        _borrow_copies(out, copy_share)
    for b in out.values():
        if repeat_share is not None and b["#calls"] >= COPY_MIN_VALUES and b["#repeats"] <= repeat_share * b["#calls"]:
            b["#norepeat"] = 1
    return {tool: dict(sorted(b.items())) for tool, b in sorted(out.items())}


def _calls_made(messages: list[dict] | None):
    """(name, arguments) of the tool calls these messages already made, those with an arguments object."""
    for m in messages or []:
        for tc in (m.get("tool_calls") or []) if isinstance(m, dict) else []:
            name, args = call_parts(tc)
            if name and isinstance(args, dict):
                yield name, args


def _made(messages: list[dict] | None) -> set[tuple[str, str]]:
    """(name, canonical arguments) of the tool calls these messages already made."""
    return {(name, canonical_json(args)) for name, args in _calls_made(messages)}


def made_values(messages: list[dict] | None) -> dict[str, dict[str, set]]:
    """Per tool, the value of each one-argument call these messages already made: {tool: {argument: values}}."""
    out: dict[str, dict[str, set]] = {}
    for name, args in _calls_made(messages):
        if len(args) == 1:
            (arg, value), = args.items()
            if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                out.setdefault(name, {}).setdefault(arg, set()).add(value)
    return out


def not_again(schema: dict[str, Any], made: dict[str, set]) -> dict[str, Any] | None:
    """`schema` (a copy) with the values the conversation already called the tool with taken out of its
    argument's enum; None when no value is left to call it with. Unchanged where the argument has no enum."""
    props = schema.get("properties")
    if len(made) != 1 or not isinstance(props, dict):
        return schema
    (arg, values), = made.items()
    p = props.get(arg)
    if not isinstance(p, dict) or not isinstance(p.get("enum"), list):
        return schema
    left = [v for v in p["enum"] if v not in values]
    if len(left) == len(p["enum"]):
        return schema
    return {**schema, "properties": {**props, arg: {**p, "enum": left}}} if left else None


def _margin(n: int) -> int:
    return n + max(8, n // 2)  # room above the longest string seen: 1.5x, at least 8 more characters


def _types(schema: dict[str, Any]) -> set:
    types = schema.get("type")
    return set(types) if isinstance(types, list) else {types} if isinstance(types, str) else set()


def _decoded_as_copy(schema: Any, bounds: dict[str, int], path: str) -> bool:
    """The argument at `path` is a free string (no enum, const, pattern or format of its own) that the bounds mark
    `#copy`: decoded as one of the request's tokens (`copy_candidates`)."""
    return (isinstance(schema, dict) and _types(schema) == {"string"} and bool(bounds.get(path + "#copy"))
            and not ({"enum", "const", "pattern", "format"} & schema.keys()))


def bound_schema(schema: Any, bounds: dict[str, int] | None, path: str = "",
                 tokens: dict[str, tuple[int, set[str]]] | None = None) -> Any:
    """`schema` with free strings and lists capped (a copy): at a margin above the longest the LLM wrote at
    that path, a free string it never wrote at UNSEEN_STRING_CHARS. Enums, consts, patterns, formats and the
    schema's own maxLength / maxItems are left as they are. With the request's `tokens` (token -> its character
    classes and where it stands), a free string marked `#copy` becomes an enum of the tokens it may copy (when
    there are some)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    bounds = bounds or {}
    types = _types(out)
    free = "string" in types and not ({"enum", "const", "pattern", "format"} & out.keys())
    if tokens is not None and _decoded_as_copy(out, bounds, path):
        candidates = copy_candidates(tokens, bounds, path, out)
        if candidates:
            out["enum"] = candidates
            return out
    if free and "maxLength" not in out:
        seen = bounds.get(path + "#chars")
        cap = _margin(seen) if seen is not None else UNSEEN_STRING_CHARS
        out["maxLength"] = max(cap, out.get("minLength") if isinstance(out.get("minLength"), int) else 0)
    if "array" in types and "maxItems" not in out and (path + "#items") in bounds:
        n = bounds[path + "#items"]
        out["maxItems"] = max(n + max(1, n // 2), out.get("minItems") if isinstance(out.get("minItems"), int) else 0)  # 1.5x, at least one more
    if isinstance(out.get("properties"), dict):
        out["properties"] = {k: bound_schema(v, bounds, f"{path}/{k}", tokens) for k, v in out["properties"].items()}
    if isinstance(out.get("items"), dict):
        out["items"] = bound_schema(out["items"], bounds, path + "/*", tokens)
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(out.get(key), list):
            out[key] = [bound_schema(v, bounds, path, tokens) for v in out[key]]
    return out


def _tool_specs(tools: list[dict] | None) -> list[tuple[str, dict]]:
    out = []
    for t in tools or []:
        fn = t.get("function", t) if isinstance(t, dict) else {}
        name = fn.get("name") if isinstance(fn, dict) else None
        if isinstance(name, str) and name:
            params = fn.get("parameters")
            out.append((name, params if isinstance(params, dict) and params else {"type": "object"}))
    return out


def name_text(name: str) -> str:
    """How a call to `name` opens, through the name's closing quote."""
    return TRIGGER + json.dumps({"name": name})[:-1]


def opening_text(name: str) -> str:
    """How a call to `name` opens, up to its arguments: the grammar's tag begins with it."""
    return name_text(name) + ', "arguments": '


def structural_tag(tools: list[tuple[str, dict]]) -> dict[str, Any]:
    """The xgrammar structural tag for these (name, JSON schema) tools."""
    tags = [{"type": "tag", "begin": opening_text(name),
             "content": {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": MAX_WHITESPACE},
             "end": "}</tool_call>"} for name, schema in tools]
    return {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": [TRIGGER], "tags": tags,
                                                   "at_least_one": False, "stop_after_first": False}}


def loosened(specs: list[tuple[str, dict]], compile_tag, loose: set[str]) -> tuple[list[tuple[str, dict]], Any]:
    """`specs` with each tool whose schema xgrammar rejects (`compile_tag` raises on its structural tag)
    given any JSON object as arguments, its name kept (those names are added to `loose`), and what
    `compile_tag` made of the structural tag of the specs returned."""
    try:
        return specs, compile_tag(structural_tag(specs))
    except Exception:  # noqa: BLE001 - a schema xgrammar rejects: loosen that tool's arguments, keep its name
        good = []
        for name, schema in specs:
            try:
                compile_tag(structural_tag([(name, schema)]))
                good.append((name, schema))
            except Exception:  # noqa: BLE001
                loose.add(name)
                good.append((name, {"type": "object"}))
        return good, compile_tag(structural_tag(good))


def copies_enforced(bounds: dict[str, dict[str, int]] | None) -> bool:
    """Some argument of these tools is decoded as a copy of the request (see the module's docstring)."""
    return any(k.endswith("#copy") for b in (bounds or {}).values() for k in b)


def nothing_to_copy(original: dict[str, Any], bounded: dict[str, Any], bounds: dict[str, int]) -> bool:
    """A required argument of the tool is decoded as a copy (`#copy`: the LLM copied it from the request in at least
    copy_share of its calls) and the request holds nothing it may copy (`bound_schema` made no enum of it): the SLM
    could only invent that value (a user id nobody gave), where the LLM made some other answer."""
    if not isinstance(original, dict) or not isinstance(bounded, dict):
        return False
    props, kept, required = original.get("properties"), bounded.get("properties"), original.get("required")
    if not isinstance(props, dict) or not isinstance(kept, dict) or not isinstance(required, list):
        return False  # a schema of another shape: offered as it is
    return any(isinstance(arg, str) and _decoded_as_copy(props.get(arg), bounds, f"/{arg}") and "enum" not in (kept.get(arg) or {})
               for arg in required)


def bounded_specs(tools: list[dict] | None, bounds: dict[str, dict[str, int]] | None,
                  messages: list[dict] | None = None) -> list[tuple[str, dict]]:
    """The offered tools as (name, schema), their arguments capped by `bounds` (None: schemas as given), the
    arguments it marks `#copy` limited to copies of these request `messages`' tokens (a tool with a required one
    that has nothing to copy is not offered: `nothing_to_copy`), and the tools it marks `#norepeat` kept from
    repeating a one-argument call of the `messages` (see the module's docstring). A grammar must offer some tool:
    where either rule would leave none, it does not apply."""
    specs = _tool_specs(tools)
    if bounds is not None:
        tokens = ({t: (_classes(t), src) for t, src in request_sources(messages).items()}
                  if messages is not None and copies_enforced(bounds) else None)
        given = specs
        specs = [(name, bound_schema(schema, bounds.get(name), "", tokens)) for name, schema in specs]
        if tokens is not None:  # a call whose copied argument has nothing to copy could only be invented: not offered
            specs = [(name, schema) for (name, schema), (_, original) in zip(specs, given)
                     if not nothing_to_copy(original, schema, bounds.get(name) or {})] or specs
        made = made_values(messages) if any(b.get("#norepeat") for b in bounds.values()) else {}
        if made:
            fresh = [(name, not_again(schema, made[name]) if name in made and (bounds.get(name) or {}).get("#norepeat") else schema)
                     for name, schema in specs]
            fresh = [(name, schema) for name, schema in fresh if schema is not None]
            specs = fresh or specs  # a grammar must offer some tool: with none left, repeats stay allowed
    return specs


class BuiltOnce:
    """Values built once per key (a JSON-able object: the offered tool specs, and whatever else decides the value),
    shared by threads; the least recently used go beyond `size` (copied arguments make grammars per request)."""

    def __init__(self, size: int = 256) -> None:
        from collections import OrderedDict

        self._items: OrderedDict[str, Any] = OrderedDict()
        self._size = size
        self._lock = threading.RLock()  # a build may itself get from the same cache

    def get(self, key: Any, build: Callable[[], Any]) -> Any:
        digest = sha256_obj(key)
        with self._lock:
            if digest in self._items:
                self._items.move_to_end(digest)
                return self._items[digest]
            value = self._items[digest] = build()
            if len(self._items) > self._size:
                self._items.popitem(last=False)
            return value


class ToolGrammars:
    """Compiled grammars for one tokenizer, per offered tool set (None: nothing to constrain)."""

    def __init__(self, tokenizer, vocab_size: int | None = None):
        import xgrammar as xgr

        size = max(vocab_size or 0, len(tokenizer))
        self.compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=size))
        self._cache = BuiltOnce()
        self.loose: set[str] = set()  # tools whose schema could not be compiled: any JSON object as arguments

    def for_tools(self, tools: list[dict] | None, bounds: dict[str, dict[str, int]] | None = None,
                  messages: list[dict] | None = None):
        """The compiled grammar for these offered tools, their arguments capped by `bounds`
        (argument_bounds of the site; None: schemas as given), copies taken from the request's `messages`."""
        return self.for_specs(bounded_specs(tools, bounds, messages))

    def for_specs(self, specs: list[tuple[str, dict]]):
        """The compiled grammar for these (name, schema) tools (`bounded_specs`); None when there are none."""
        if not specs:
            return None
        return self._cache.get(specs, lambda: self._compile(specs))

    def _compile(self, specs: list[tuple[str, dict]]):
        return loosened(specs, lambda tag: self.compiler.compile_structural_tag(json.dumps(tag)), self.loose)[1]

    def free(self):
        """A grammar that allows any text: for the requests of a batch that offer no tools."""
        return self._cache.get("free text", lambda: self.compiler.compile_grammar(r'root ::= [^]*'))


def logits_processor(grammars: ToolGrammars, compiled: list):
    """A fresh transformers logits processor for one generate() call, one grammar per batch row."""
    import xgrammar as xgr

    if all(g is None for g in compiled):
        return None
    return xgr.contrib.hf.LogitsProcessor([g if g is not None else grammars.free() for g in compiled])


def tool_grammars(tokenizer, vocab_size: int | None = None, problems: list[str] | None = None) -> ToolGrammars | None:
    """ToolGrammars for this tokenizer, or None (and a problem said) when xgrammar cannot be used here."""
    try:
        return ToolGrammars(tokenizer, vocab_size)
    except Exception as e:  # noqa: BLE001 - an engine that cannot load must not stop evaluation: decode unconstrained
        if problems is not None:
            problems.append(f"schema-constrained decoding is off: xgrammar could not be used ({type(e).__name__}: {e}); "
                            "tool calls are decoded freely and checked against the schemas afterwards")
        return None


ENGINE_GRAMMARS = ("structural_tag", "gbnf", "none")
GBNF_TRIGGER_WORD = 1  # llama.cpp's COMMON_GRAMMAR_TRIGGER_TYPE_WORD
_GBNF_ESCAPES = set('trn\\"[]xuU')


def _gbnf_escapes(body: str) -> str:
    """A literal's or character class's escapes as GBNF reads them (it knows \\t \\r \\n \\\\ \\" \\[ \\] \\x \\u \\U)."""
    out, i = [], 0
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body):
            n = body[i + 1]
            out.append(body[i:i + 2] if n in _GBNF_ESCAPES else "\\x00" if n == "0" else "\\x%02X" % ord(n))
            i += 2
        else:
            out.append(body[i])
            i += 1
    return "".join(out)


def _ebnf_tokens(line: str):
    """(kind, text) of one rule line of xgrammar's printed EBNF: str, cls, id, rep ({m, n}), look ((=), op."""
    i = 0
    while i < len(line):
        c = line[i]
        if c in '"[':
            close = '"' if c == '"' else "]"
            j = i + 1
            while line[j] != close:
                j += 2 if line[j] == "\\" else 1
            yield ("str" if c == '"' else "cls"), line[i:j + 1]
            i = j + 1
        elif c.isalnum() or c == "_":
            j = i
            while j < len(line) and (line[j].isalnum() or line[j] in "_-"):
                j += 1
            yield "id", line[i:j]
            i = j
        elif c == "{":
            j = line.index("}", i)
            yield "rep", line[i + 1:j]
            i = j + 1
        elif line.startswith("::=", i):
            yield "op", "::="
            i += 3
        elif line.startswith("(=", i):
            yield "look", "(="
            i += 2
        else:
            yield "op", c
            i += 1


_REGEX_RULE = re.compile(r'^(\w+) ::= Regex\("((?:[^"\\]|\\.)*)"(?:, json_string=(?:true|false))?\)$')
_PLAIN_STRING_CONTENT = r'[^"\\\x00-\x1f]*'


def _expand_regex_rules(lines: list[str]) -> list[str]:
    """xgrammar prints a `pattern` as `name ::= Regex("...")`, which GBNF lacks: written out as grammar rules
    (xgrammar's own regex converter), or, where it cannot, as any string content (looser than in-process;
    serve's schema check still refuses what the pattern forbids)."""
    out = []
    for line in lines:
        m = _REGEX_RULE.match(line)
        if m is None:
            out.append(line)
            continue
        name, pattern = m.group(1), json.loads('"' + m.group(2) + '"')
        try:
            from xgrammar.testing import _regex_to_ebnf  # xgrammar's regex -> EBNF (not yet public API)

            sub = [r for r in _regex_to_ebnf(pattern).strip().splitlines() if r.strip()]
            if not sub or not all(" ::= " in r for r in sub) or any("Regex(" in r for r in sub):
                raise ValueError(pattern)
        except Exception:  # noqa: BLE001 - a pattern written as any string content
            sub = [f"root ::= {_PLAIN_STRING_CONTENT}"]
        for r in sub:
            head, body = r.split(" ::= ", 1)
            body = re.sub(r"\b(root\w*)\b(?=(?:[^\"]|\"(?:[^\"\\]|\\.)*\")*$)", lambda k: name + "_re" + k.group(1)[4:], body)
            out.append(f"{name if head == 'root' else name + '_re' + head[4:]} ::= {body}")
    return out


def ebnf_to_gbnf(ebnf: str, prefix: str) -> list[str]:
    """xgrammar's printed EBNF of a JSON schema as llama.cpp GBNF rules: names prefixed and with hyphens (GBNF
    names have no underscores), lookahead assertions dropped (they only speed xgrammar up; the language is the
    same), repetition ranges as {m,n} / {m,}, escapes GBNF does not know written as \\xHH."""
    rules = []
    for line in _expand_regex_rules(ebnf.strip().splitlines()):
        parts: list[str] = []
        skipping = 0
        for kind, text in _ebnf_tokens(line):
            if skipping:
                skipping += 1 if (kind == "look" or text == "(") else -1 if text == ")" else 0
                continue
            if kind == "look":
                skipping = 1
            elif kind == "id":
                parts.append(prefix + text.replace("_", "-"))
            elif kind in ("str", "cls"):
                parts.append(text[0] + _gbnf_escapes(text[1:-1]) + text[-1])
            elif kind == "rep":
                lo, sep, hi = (x.strip() for x in text.partition(","))
                parts.append("{%s,%s}" % (lo, "" if hi == "-1" else hi) if sep else "{%s}" % lo)
            elif text.strip():
                parts.append(text)
        rules.append(" ".join(parts))
    return rules


def gbnf_rules(schema: dict, prefix: str) -> list[str]:
    """One tool's arguments in GBNF (rules named `prefix`...; `prefix`root the start): converted by xgrammar."""
    import xgrammar as xgr

    ebnf = str(xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=True, max_whitespace_cnt=MAX_WHITESPACE))
    return ebnf_to_gbnf(ebnf, prefix)


def gbnf(tools: list[tuple[str, dict]], rules: list[list[str]] | None = None) -> str:
    """llama.cpp GBNF for the text from the trigger on (a lazy grammar, triggered by `<tool_call>`): one or more
    calls of the offered tools, each `<tool_call>{"name": "<tool>", "arguments": <schema-valid JSON>}</tool_call>`,
    newline-separated as the adapters were trained; each schema converted by xgrammar, as in-process (`rules`:
    those conversions already made, in the tools' order)."""
    alts, body = [], []
    for i, (name, schema) in enumerate(tools):
        body += rules[i] if rules is not None else gbnf_rules(schema, f"t{i}-")
        head = json.dumps({"name": name})[:-1] + ', "arguments": '
        alts.append(json.dumps(head) + f" t{i}-root")
    return "\n".join(["root ::= call (\"\\n\" call)*",
                      f'call ::= "{TRIGGER}" ( {" | ".join(f"( {a} )" for a in alts)} ) "}}</tool_call>"', *body]) + "\n"


class EngineGrammar:
    """What an external engine (`serve --slm-backend`) is sent so that it decodes tool calls under the grammar
    evaluate verified the policy with, capped by the same argument bounds. structural_tag: the same xgrammar
    structural tag, as vLLM's `structured_outputs.structural_tag` (vLLM compiles it with xgrammar, as evaluate
    did). gbnf: llama-server's lazy `grammar` from the `<tool_call>` trigger on, each schema converted by
    xgrammar and written in GBNF (`gbnf`). Cached per tool set; a tool whose schema xgrammar rejects is loosened
    here exactly as in-process."""

    def __init__(self) -> None:
        self._cache = BuiltOnce()
        self._parts = BuiltOnce(1024)  # per tool set: the tools xgrammar rejects; per tool schema: its GBNF rules
        self.loose: set[str] = set()

    def fields(self, kind: str, tools: list[dict] | None, bounds: dict[str, dict[str, int]] | None = None,
               messages: list[dict] | None = None) -> dict[str, Any]:
        """Extra request-body fields for an engine of grammar `kind` (ENGINE_GRAMMARS); {} when nothing is constrained."""
        if kind == "none":
            return {}
        if kind not in ENGINE_GRAMMARS:
            raise ValueError(f"unknown engine grammar {kind!r} (known: {', '.join(ENGINE_GRAMMARS)})")
        specs = bounded_specs(tools, bounds, messages)
        if not specs:
            return {}
        # which tools xgrammar rejects is decided once per tool set (copied arguments' enums never change it), so
        # a request's own enums cost only the writing, not another validation
        plain = (lambda: bounded_specs(tools, bounds)) if messages is not None and copies_enforced(bounds) else (lambda: specs)
        loose = self._parts.get(["loosened", tools, bounds], lambda: self._loosened(plain()))
        specs = [(name, {"type": "object"} if name in loose else schema) for name, schema in specs]
        return self._cache.get([kind, specs], lambda: self._build(kind, specs))

    def _loosened(self, specs: list[tuple[str, dict]]) -> set[str]:
        import xgrammar as xgr

        found: set[str] = set()
        loosened(specs, lambda tag: xgr.Grammar.from_structural_tag(json.dumps(tag)), found)
        self.loose |= found
        return found

    def _build(self, kind: str, specs: list[tuple[str, dict]]) -> dict[str, Any]:
        if kind == "structural_tag":
            return {"structured_outputs": {"structural_tag": json.dumps(structural_tag(specs))}}
        # llama-server: free text until the trigger, the calls' grammar from there on; each tool's rules once per schema
        rules = [self._parts.get(["gbnf", i, schema], lambda i=i, schema=schema: gbnf_rules(schema, f"t{i}-"))
                 for i, (_, schema) in enumerate(specs)]
        return {"grammar": gbnf(specs, rules), "grammar_lazy": True,
                "grammar_triggers": [{"type": GBNF_TRIGGER_WORD, "value": TRIGGER}]}
