"""Prompt compaction per call site: what a fine-tuned SLM needs to see, and nothing more.

- A static system prompt shared by every call of the site (same template once variables are
  masked) is dropped: the SLM learns the behaviour it asks for. `serve` drops it the same way.
- Tool results longer than `max_tool_result_chars` are cut, with a marker saying so.
- The history is windowed to the most recent messages that fit `max_history_tokens`; the
  window starts at a user turn when one fits, and the last message is always kept.

The recipe is data (recorded in the manifest and next to every adapter), so training,
evaluation and serving compact identically.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

RECIPE_VERSION = 1


def estimate_tokens(text: str) -> int:
    return (len(text) + 3) // 4


@dataclass
class CompactionRecipe:
    drop_system_prompt: bool = False
    system_template: str | None = None  # masked template of the static system prompt that is dropped
    max_history_tokens: int = 1536
    max_tool_result_chars: int = 2000
    drop_tools: bool = False  # the site's tool definitions never change: the SLM learns them, like the system prompt
    version: int = RECIPE_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "CompactionRecipe":
        return CompactionRecipe(**{k: v for k, v in d.items() if k in CompactionRecipe.__dataclass_fields__})


def _system_text(messages: Sequence[dict]) -> str:
    return "\n".join(m.get("content") or "" for m in messages if m.get("role") == "system").strip()


def fit_recipe(prompts: Sequence[Sequence[dict]], *, enabled: bool = True, max_history_tokens: int = 1536,
               max_tool_result_chars: int = 2000, toolsets: Sequence[Any] | None = None) -> CompactionRecipe:
    """Decide a site's recipe from its calls' prompts (and their tool definitions)."""
    from slmconvert.cluster.features import mask_variables

    if not enabled:
        return CompactionRecipe(max_history_tokens=10**9, max_tool_result_chars=10**9)
    templates = {mask_variables(_system_text(p)) for p in prompts}
    static = len(templates) == 1 and next(iter(templates)) != ""
    distinct_tools = {json.dumps(t, sort_keys=True) for t in (toolsets or []) if t}
    return CompactionRecipe(drop_system_prompt=static, system_template=next(iter(templates)) if static else None,
                            max_history_tokens=max_history_tokens, max_tool_result_chars=max_tool_result_chars,
                            drop_tools=static and len(distinct_tools) == 1)


def compact_tools(tools: list[dict] | None, recipe: CompactionRecipe) -> list[dict] | None:
    return None if recipe.drop_tools else tools


def _message_tokens(m: dict, count: Callable[[str], int]) -> int:
    n = count(m.get("content") or "")
    for tc in m.get("tool_calls") or []:
        n += count(json.dumps(tc, ensure_ascii=False))
    return n + 4  # role and separators


def compact(messages: Sequence[dict], recipe: CompactionRecipe, count: Callable[[str], int] = estimate_tokens) -> list[dict]:
    from slmconvert.cluster.features import mask_variables

    msgs = [dict(m) for m in messages]
    if recipe.drop_system_prompt and recipe.system_template is not None:
        if mask_variables(_system_text(msgs)) == recipe.system_template:
            msgs = [m for m in msgs if m.get("role") != "system"]
    system = [m for m in msgs if m.get("role") == "system"]
    rest = [m for m in msgs if m.get("role") != "system"]
    for m in rest:
        c = m.get("content")
        if m.get("role") == "tool" and isinstance(c, str) and len(c) > recipe.max_tool_result_chars:
            cut = len(c) - recipe.max_tool_result_chars
            m["content"] = c[: recipe.max_tool_result_chars] + f" …[{cut} characters truncated]"
    budget = recipe.max_history_tokens - sum(_message_tokens(m, count) for m in system)
    kept: list[dict] = []
    used = 0
    for m in reversed(rest):
        t = _message_tokens(m, count)
        if kept and used + t > budget:
            break
        kept.append(m)
        used += t
    kept.reverse()
    # Start the window at a user turn when there is one, so a tool result never opens it
    # without the call that produced it.
    if len(kept) < len(rest):
        first_user = next((i for i, m in enumerate(kept) if m.get("role") == "user"), None)
        if first_user is not None and first_user < len(kept) - 1:
            kept = kept[first_user:]
    return system + kept
