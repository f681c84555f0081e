"""Schema-constrained tool calls: the SLM may reply in free text, but once it opens a tool call it can
only name a tool the request offers and write arguments valid against that tool's JSON schema.

Built on xgrammar's structural tags (the grammar engine vLLM and SGLang use; a transformers logits
processor on CPU and GPU): text is free until the trigger `<tool_call>`, after which one of the
offered tools' tags must follow, `<tool_call>{"name": "<tool>", "arguments": <schema-valid JSON>}</tool_call>`,
the exact form the adapters were trained on (slmconvert.chat). A tool whose schema xgrammar cannot
compile keeps its name constrained and its arguments to any JSON object. Compiled grammars are cached
per tool set; the compiler is built once per tokenizer.

A schema bounds a value's type, rarely its length, and a small model caught in a loop
(`"expression": "((((((…"`, a `flights` list that never closes) runs out of tokens inside the call.
`argument_bounds` reads, from the site's training calls, the longest string and the longest list the
LLM ever wrote for each argument; `bound_schema` caps free strings and lists at a margin above that
(`maxLength`, `maxItems`; the schema's own limits win), so every call the grammar allows can end. The
bounds are part of the routing policy, so `serve` decodes under the grammar evaluate verified.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from slmconvert.io import sha256_obj

TRIGGER = "<tool_call>"
MAX_WHITESPACE = 1  # inside a call: JSON as json.dumps writes it; a model cannot stall on spaces where a value is forbidden
UNSEEN_STRING_CHARS = 256  # cap on a free string the LLM never wrote for this argument


def _walk(value: Any, path: str, out: dict[str, int]) -> None:
    if isinstance(value, str):
        out[path + "#chars"] = max(out.get(path + "#chars", 0), len(value))
    elif isinstance(value, list):
        out[path + "#items"] = max(out.get(path + "#items", 0), len(value))
        for v in value:
            _walk(v, path + "/*", out)
    elif isinstance(value, dict):
        for k, v in value.items():
            _walk(v, f"{path}/{k}", out)


def argument_bounds(invocations) -> dict[str, dict[str, int]]:
    """Per tool, per argument path ("/flights/*/date#chars", "/flights#items"): the longest string / list
    the LLM wrote in these invocations' tool calls."""
    out: dict[str, dict[str, int]] = {}
    for inv in invocations:
        for call in inv.response.tool_calls or []:
            if isinstance(call.arguments, dict) and "_raw" not in call.arguments:
                _walk(call.arguments, "", out.setdefault(call.name, {}))
    return {tool: dict(sorted(b.items())) for tool, b in sorted(out.items())}


def _margin(n: int) -> int:
    return n + max(8, n // 2)  # room above the longest string seen: 1.5x, at least 8 more characters


def bound_schema(schema: Any, bounds: dict[str, int] | None, path: str = "") -> Any:
    """`schema` with free strings and lists capped (a copy): at a margin above the longest the LLM wrote at
    that path, a free string it never wrote at UNSEEN_STRING_CHARS. Enums, consts, patterns, formats and the
    schema's own maxLength / maxItems are left as they are."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    bounds = bounds or {}
    types = out.get("type")
    types = set(types) if isinstance(types, list) else {types} if isinstance(types, str) else set()
    if "string" in types and not ({"enum", "const", "pattern", "format", "maxLength"} & out.keys()):
        seen = bounds.get(path + "#chars")
        cap = _margin(seen) if seen is not None else UNSEEN_STRING_CHARS
        out["maxLength"] = max(cap, out.get("minLength") if isinstance(out.get("minLength"), int) else 0)
    if "array" in types and "maxItems" not in out and (path + "#items") in bounds:
        n = bounds[path + "#items"]
        out["maxItems"] = max(n + max(1, n // 2), out.get("minItems") if isinstance(out.get("minItems"), int) else 0)  # 1.5x, at least one more
    if isinstance(out.get("properties"), dict):
        out["properties"] = {k: bound_schema(v, bounds, f"{path}/{k}") for k, v in out["properties"].items()}
    if isinstance(out.get("items"), dict):
        out["items"] = bound_schema(out["items"], bounds, path + "/*")
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(out.get(key), list):
            out[key] = [bound_schema(v, bounds, path) for v in out[key]]
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


def structural_tag(tools: list[tuple[str, dict]]) -> dict[str, Any]:
    """The xgrammar structural tag for these (name, JSON schema) tools."""
    tags = [{"type": "tag", "begin": TRIGGER + json.dumps({"name": name})[:-1] + ', "arguments": ',
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


def bounded_specs(tools: list[dict] | None, bounds: dict[str, dict[str, int]] | None) -> list[tuple[str, dict]]:
    """The offered tools as (name, schema), their arguments capped by `bounds` (None: schemas as given)."""
    specs = _tool_specs(tools)
    if bounds is not None:
        specs = [(name, bound_schema(schema, bounds.get(name))) for name, schema in specs]
    return specs


class ToolGrammars:
    """Compiled grammars for one tokenizer, per offered tool set (None: nothing to constrain)."""

    def __init__(self, tokenizer, vocab_size: int | None = None):
        import xgrammar as xgr

        size = max(vocab_size or 0, len(tokenizer))
        self.compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=size))
        self._cache: dict[str, Any] = {}
        self._free = None
        self._lock = threading.Lock()
        self.loose: set[str] = set()  # tools whose schema could not be compiled: any JSON object as arguments

    def for_tools(self, tools: list[dict] | None, bounds: dict[str, dict[str, int]] | None = None):
        """The compiled grammar for these offered tools, their arguments capped by `bounds`
        (argument_bounds of the site; None: schemas as given)."""
        specs = bounded_specs(tools, bounds)
        if not specs:
            return None
        key = sha256_obj(specs)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = self._compile(specs)
            return self._cache[key]

    def _compile(self, specs: list[tuple[str, dict]]):
        return loosened(specs, lambda tag: self.compiler.compile_structural_tag(json.dumps(tag)), self.loose)[1]

    def free(self):
        """A grammar that allows any text: for the requests of a batch that offer no tools."""
        with self._lock:
            if self._free is None:
                self._free = self.compiler.compile_grammar(r'root ::= [^]*')
            return self._free


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


ENGINE_GRAMMARS = ("structural_tag", "none")


class EngineGrammar:
    """What an external engine (`serve --slm-backend`) is sent so that it decodes tool calls under the grammar
    evaluate verified the policy with: the same xgrammar structural tag, capped by the same argument bounds,
    as vLLM's `structured_outputs.structural_tag` (vLLM compiles it with xgrammar, as evaluate did). Cached per
    tool set; a tool whose schema xgrammar rejects is loosened here exactly as in-process."""

    def __init__(self) -> None:
        self._cache: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self.loose: set[str] = set()

    def fields(self, kind: str, tools: list[dict] | None, bounds: dict[str, dict[str, int]] | None = None) -> dict[str, Any]:
        """Extra request-body fields for an engine of grammar `kind` (ENGINE_GRAMMARS); {} when nothing is constrained."""
        if kind == "none":
            return {}
        if kind != "structural_tag":
            raise ValueError(f"unknown engine grammar {kind!r} (known: {', '.join(ENGINE_GRAMMARS)})")
        specs = bounded_specs(tools, bounds)
        if not specs:
            return {}
        key = sha256_obj(specs)
        with self._lock:
            if key not in self._cache:
                import xgrammar as xgr

                specs, _ = loosened(specs, lambda tag: xgr.Grammar.from_structural_tag(json.dumps(tag)), self.loose)
                self._cache[key] = {"structured_outputs": {"structural_tag": json.dumps(structural_tag(specs))}}
            return self._cache[key]
