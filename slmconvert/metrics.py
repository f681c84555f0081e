"""Per-example metrics comparing an SLM's answer with the LLM's logged response (a registry).

Each metric takes (expected Response, Prediction, the tool schemas of the call) and returns a
score in [0, 1], or None when it does not apply (argument accuracy on a text reply, chrF on a
tool call). `select` probes and `evaluate` use the same functions.

Argument matching follows the Berkeley Function-Calling Leaderboard's AST checker in spirit:
key order, int vs float (3 == 3.0), surrounding whitespace and case of strings do not count as
errors; a missing required argument, an argument the expected call does not have, a wrong type
(a string "3" for a number) or a different value do. A bool is never a number.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable

from slmconvert.invocation import Response
from slmconvert.registry import Registry


@dataclass
class Prediction:
    response: Response
    well_formed: bool = True  # False: it tried to call a tool but the call was not valid JSON
    text: str = ""


MetricFn = Callable[[Response, Prediction, "list[dict] | None"], "float | None"]
metrics: Registry = Registry("metric")

_WS = re.compile(r"\s+")


def _norm_str(s: str) -> str:
    return _WS.sub(" ", s.strip()).lower()


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _prop_schema(schema: dict | None, key: str) -> dict | None:
    props = (schema or {}).get("properties") or {}
    sub = props.get(key)
    return sub if isinstance(sub, dict) else None


def values_match(expected: Any, got: Any, schema: dict | None = None) -> bool:
    """One value against another; `schema` is the JSON schema of this value when known (nested objects use it)."""
    if isinstance(expected, bool) or isinstance(got, bool):
        return isinstance(expected, bool) and isinstance(got, bool) and expected == got
    if _is_number(expected) or _is_number(got):
        return _is_number(expected) and _is_number(got) and float(expected) == float(got)
    if isinstance(expected, str) or isinstance(got, str):
        return isinstance(expected, str) and isinstance(got, str) and _norm_str(expected) == _norm_str(got)
    if isinstance(expected, list) or isinstance(got, list):
        items = (schema or {}).get("items") if isinstance((schema or {}).get("items"), dict) else None
        return (isinstance(expected, list) and isinstance(got, list) and len(expected) == len(got)
                and all(values_match(a, b, items) for a, b in zip(expected, got)))
    if isinstance(expected, dict) or isinstance(got, dict):
        return isinstance(expected, dict) and isinstance(got, dict) and arguments_match(expected, got, schema)
    return expected == got


def schema_for(tools: list[dict] | None, name: str) -> dict | None:
    for t in tools or []:
        fn = t.get("function", t)
        if fn.get("name") == name:
            return fn.get("parameters") or {}
    return None


def _is_default(schema: dict | None, key: str, value: Any) -> bool:
    """An optional argument left out is no error when the other side gave exactly its declared default."""
    sub = _prop_schema(schema, key)
    return sub is not None and "default" in sub and values_match(sub["default"], value)


def arguments_match(expected: dict, got: dict, schema: dict | None = None) -> bool:
    """BFCL-style: missing required or unexpected arguments fail; every shared value must match.

    An optional argument present on one side only is accepted when its value is the schema's default.
    """
    required = set((schema or {}).get("required") or [])
    if not required.issubset(got):
        return False
    for k in set(expected) ^ set(got):
        present = expected if k in expected else got
        if k in required or not _is_default(schema, k, present[k]):
            return False
    return all(values_match(expected[k], got[k], _prop_schema(schema, k)) for k in set(expected) & set(got))


def argument_diff(expected: dict, got: dict, schema: dict | None = None) -> dict[str, bool]:
    """Per-argument correctness over the expected arguments (for per-argument accuracy)."""
    return {k: (values_match(v, got[k], _prop_schema(schema, k)) if k in got else _is_default(schema, k, v))
            for k, v in expected.items()}


def _calls_match(expected: Response, got: Response, tools: list[dict] | None, with_args: bool) -> bool:
    exp, pred = expected.tool_calls, got.tool_calls
    if len(exp) != len(pred):
        return False
    remaining = list(pred)
    for call in exp:  # order of parallel calls does not matter
        hit = next((p for p in remaining if p.name == call.name and
                    (not with_args or arguments_match(call.arguments, p.arguments, schema_for(tools, call.name)))), None)
        if hit is None:
            return False
        remaining.remove(hit)
    return True


@metrics.register("call_agreement")
def call_agreement(expected: Response, pred: Prediction, tools=None) -> float:
    """Both answered with a tool call, or both answered in text."""
    return float(bool(expected.tool_calls) == bool(pred.response.tool_calls))


@metrics.register("function_name")
def function_name(expected: Response, pred: Prediction, tools=None) -> float | None:
    if not expected.tool_calls:
        return None
    return float(_calls_match(expected, pred.response, tools, with_args=False))


@metrics.register("arguments")
def arguments(expected: Response, pred: Prediction, tools=None) -> float | None:
    if not expected.tool_calls:
        return None
    return float(_calls_match(expected, pred.response, tools, with_args=True))


def argument_outcomes(expected: Response, got: Response, tools: list[dict] | None) -> tuple[list[tuple[str, str, bool]], int]:
    """(tool, argument, right?) for every expected argument, and the number of unexpected arguments.

    Calls are paired by name, in order, each predicted call used once; the arguments of an expected
    call the model did not make are wrong; an unexpected argument at its schema default is no error.
    """
    remaining = list(got.tool_calls)
    outcomes: list[tuple[str, str, bool]] = []
    unexpected = 0
    for call in expected.tool_calls:
        hit = next((p for p in remaining if p.name == call.name), None)
        if hit is None:
            outcomes += [(call.name, k, False) for k in call.arguments]
            continue
        remaining.remove(hit)
        schema = schema_for(tools, call.name)
        outcomes += [(call.name, k, ok) for k, ok in argument_diff(call.arguments, hit.arguments, schema).items()]
        unexpected += sum(1 for k in hit.arguments if k not in call.arguments and not _is_default(schema, k, hit.arguments[k]))
    return outcomes, unexpected


@metrics.register("argument_values")
def argument_values(expected: Response, pred: Prediction, tools=None) -> float | None:
    """Per-argument accuracy: the share of expected arguments given with the right value (see
    `argument_outcomes`; unexpected arguments count as errors)."""
    if not expected.tool_calls:
        return None
    outcomes, unexpected = argument_outcomes(expected, pred.response, tools)
    total = len(outcomes) + unexpected
    return sum(ok for _, _, ok in outcomes) / total if total else None


@metrics.register("exact_match")
def exact_match(expected: Response, pred: Prediction, tools=None) -> float:
    def canon(r: Response) -> str:
        return json.dumps({"content": (r.content or "").strip() if not r.tool_calls else "",
                           "calls": sorted(json.dumps([c.name, c.arguments], sort_keys=True) for c in r.tool_calls)}, sort_keys=True)
    return float(canon(expected) == canon(pred.response))


@metrics.register("valid_json")
def valid_json(expected: Response, pred: Prediction, tools=None) -> float | None:
    """Of the answers that tried to call a tool, the share whose call parsed."""
    tried = bool(pred.response.tool_calls) or not pred.well_formed
    return float(pred.well_formed) if tried else None


@metrics.register("chrf")
def chrf(expected: Response, pred: Prediction, tools=None) -> float | None:
    if expected.tool_calls:
        return None
    import sacrebleu

    got = pred.response.content if not pred.response.tool_calls else ""
    return sacrebleu.sentence_chrf(got or "", [expected.content or ""]).score / 100.0


_ROUGE = None


@metrics.register("rouge_l")
def rouge_l(expected: Response, pred: Prediction, tools=None) -> float | None:
    if expected.tool_calls:
        return None
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    got = pred.response.content if not pred.response.tool_calls else ""
    return float(_ROUGE.score(expected.content or "", got or "")["rougeL"].fmeasure)


def score(expected: Response, pred: Prediction, tools: list[dict] | None, names: list[str] | None = None) -> dict[str, float | None]:
    return {name: metrics.get(name)(expected, pred, tools) for name in (names or list(metrics.names()))}


def headline(scores: dict[str, float | None]) -> float:
    """One number per example for ranking: tool calls need the right call with the right arguments;
    text replies are scored by chrF (0 when the model called a tool instead)."""
    if scores.get("function_name") is not None:
        return (scores["function_name"] + (scores.get("arguments") or 0.0)) / 2.0
    return (scores.get("chrf") or 0.0) * scores.get("call_agreement", 1.0)
