"""Tool inventories: inferred from the calls seen when a log carries no tool definitions.

Calls are grouped by call site proxy (the system prompt with digits masked, so a date in the
prompt does not split an agent in two); each group gets OpenAI function schemas with the
argument names, their JSON types (nested objects and arrays too) and `required` = the
arguments present in every call. A user tools file overrides inferred tools by name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

from slmconvert.errors import ConfigError
from slmconvert.io import sha256_text

_DIGITS = re.compile(r"\d")


def toolset_key(messages: list[dict], agent: str | None) -> str:
    system = "\n".join(m.get("content") or "" for m in messages if m.get("role") == "system")
    basis = _DIGITS.sub("0", system) if system else f"agent:{agent or ''}"
    return sha256_text(basis)[:16]


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


class _SchemaBuilder:
    """Accumulates observed values of one JSON position and renders a JSON schema for it."""

    def __init__(self) -> None:
        self.types: set[str] = set()
        self.props: dict[str, _SchemaBuilder] = {}
        self.prop_counts: dict[str, int] = {}
        self.objects = 0
        self.items: _SchemaBuilder | None = None

    def add(self, value: Any) -> None:
        t = json_type(value)
        self.types.add(t)
        if t == "object":
            self.objects += 1
            for k, v in value.items():
                self.props.setdefault(k, _SchemaBuilder()).add(v)
                self.prop_counts[k] = self.prop_counts.get(k, 0) + 1
        elif t == "array":
            for v in value:
                if self.items is None:
                    self.items = _SchemaBuilder()
                self.items.add(v)

    def schema(self) -> dict[str, Any]:
        types = set(self.types)
        if {"integer", "number"} <= types:
            types.discard("integer")
        out: dict[str, Any] = {}
        if len(types) == 1:
            out["type"] = next(iter(types))
        elif types:
            out["type"] = sorted(types)
        if "object" in types:
            out["properties"] = {k: b.schema() for k, b in self.props.items()}
            req = [k for k, n in self.prop_counts.items() if n == self.objects]
            if req:
                out["required"] = req
        if "array" in types and self.items is not None:
            out["items"] = self.items.schema()
        return out


class ToolInference:
    """Tool schemas inferred per tool set, fed one call at a time (memory holds schemas, not calls)."""

    def __init__(self) -> None:
        self._sets: dict[str, tuple[dict[str, _SchemaBuilder], dict[str, int]]] = {}

    def ensure(self, key: str) -> None:
        self._sets.setdefault(key, ({}, {}))

    def add(self, key: str, name: str, args: dict) -> None:
        builders, counts = self._sets.setdefault(key, ({}, {}))
        builders.setdefault(name, _SchemaBuilder()).add(args)
        counts[name] = counts.get(name, 0) + 1

    def keys(self) -> list[str]:
        return list(self._sets)

    def tools(self, key: str) -> list[dict]:
        return _render(*self._sets.get(key, ({}, {})))


def infer_tools(calls: Iterable[tuple[str, dict]]) -> list[dict]:
    """OpenAI tool schemas from observed (name, arguments) pairs, sorted by name."""
    inference = ToolInference()
    for name, args in calls:
        inference.add("", name, args)
    return inference.tools("")


def _render(builders: dict[str, _SchemaBuilder], counts: dict[str, int]) -> list[dict]:
    tools = []
    for name in sorted(builders):
        params = builders[name].schema()
        params["type"] = "object"
        params.setdefault("properties", {})
        tools.append({
            "type": "function",
            "function": {
                "name": name,
                "description": f"Inferred by slmconvert from {counts[name]} observed call(s).",
                "parameters": params,
            },
        })
    return tools


def load_tools_file(path: str | Path) -> list[dict]:
    """A tools file: a JSON list of tools (OpenAI form or bare {name, parameters}), or {"tools": [...]}."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(str(p), ["tools file not found"]) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(str(p), [f"not valid JSON: {e}"]) from None
    if isinstance(data, dict) and isinstance(data.get("tools"), list):
        data = data["tools"]
    if not isinstance(data, list):
        raise ConfigError(str(p), ['expected a list of tools or {"tools": [...]}'])
    tools, problems = [], []
    for i, t in enumerate(data):
        fn = t.get("function") if isinstance(t, dict) and isinstance(t.get("function"), dict) else t
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            problems.append(f"tools[{i}]: needs a 'name' (string)")
            continue
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            problems.append(f"tools[{i}].parameters: must be a JSON schema object")
            continue
        tools.append({"type": "function", "function": {"name": fn["name"], "description": fn.get("description", ""), "parameters": params}})
    if problems:
        raise ConfigError(str(p), problems)
    return tools


def merge_tools(inferred: list[dict], from_file: list[dict] | None) -> list[dict]:
    if not from_file:
        return inferred
    names = {t["function"]["name"] for t in from_file}
    return list(from_file) + [t for t in inferred if t["function"]["name"] not in names]
