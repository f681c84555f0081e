"""Prompt compaction per call site: what a fine-tuned SLM needs to see, and nothing more.

- A static system prompt shared by every call of the site (same template once variables are
  masked) is dropped: the SLM learns the behaviour it asks for. `serve` drops it the same way.
  When the site's prompts come in variants (a per-user profile, a date, a product block in an
  otherwise fixed text), the part they share (a long common head and tail) is dropped and the
  part that varies is kept.
- Tool results longer than `max_tool_result_chars` are cut, with a marker saying so.
- The history is windowed to the most recent messages that fit `max_history_tokens`; the
  window starts at a user turn when one fits, and the last message is always kept.
- Values the window drops but the agent copies later are carried: the site's training calls show
  which keys of tool results and tool-call arguments hold values the LLM copies into its calls
  (an order id, a user id, a date), and the values of those keys in the dropped messages are kept
  as one short line at the head of the window ("Earlier in this conversation: order_id=…"). A small
  model can copy an id it sees; it can only guess one the window cut away.
- Opt-in (`carry_calls`, `carry_order`; off by default, see the README for the τ-bench run that
  found them harmful for a 135M model): the tool calls the window drops named there too, with their
  arguments ("called lookup_order(order_id=…); …"), values shown in a named call not repeated; and
  the values of the most copied keys first instead of the most recent.

The recipe is data (recorded in the manifest and next to every adapter), so training,
evaluation and serving compact identically.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

from slmconvert.invocation import call_parts

RECIPE_VERSION = 4  # 4: carry_calls and carry_order (both off by default: the recipe compacts as version 3 did)
CARRY_MIN_COPIES = 3  # a key is carried when the LLM copied its values at least this often ...
CARRY_MIN_RATE = 0.05  # ... in at least this share of the times the key appeared in a prompt
CARRY_HEADER = "Earlier in this conversation: "
CALL_VALUE_CHARS = 40  # a named earlier call shows each argument value up to this many characters
# A shared head/tail is worth dropping when it is at least this long (characters) ...
MIN_SHARED_CHARS = 200
_BOUNDARY_CHARS = "\n.!?"


def estimate_tokens(text: str) -> int:
    return (len(text) + 3) // 4


@dataclass
class CompactionRecipe:
    drop_system_prompt: bool = False
    system_template: str | None = None  # masked template of the static system prompt that is dropped
    max_history_tokens: int = 1536
    max_tool_result_chars: int = 2000
    drop_tools: bool = False  # the site's tool definitions never change: the SLM learns them, like the system prompt
    system_prefix: str | None = None  # head every variant of the site's system prompt shares: dropped
    system_suffix: str | None = None  # tail every variant shares: dropped
    carry_keys: list[str] | None = None  # keys whose values the LLM copies: kept from messages the window drops
    max_carried: int = 0  # at most this many carried values (0: none)
    carry_calls: int = 0  # at most this many of the dropped tool calls named, the most recent (0: none)
    carry_order: str = "recent"  # carried values most recent first, or "copied": the most copied keys' first
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        if self._opt_ins_off():
            self.version = min(self.version, 3)  # compacts as version 3 did: recorded so (adapter fingerprints unchanged)

    def _opt_ins_off(self) -> bool:
        return self.carry_calls == 0 and self.carry_order == "recent"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self._opt_ins_off():  # the version 3 record
            del d["carry_calls"], d["carry_order"]
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "CompactionRecipe":
        return CompactionRecipe(**{k: v for k, v in d.items() if k in CompactionRecipe.__dataclass_fields__})


def _system_text(messages: Sequence[dict]) -> str:
    return "\n".join(m.get("content") or "" for m in messages if m.get("role") == "system").strip()


def _leaves(obj: Any, key: str | None = None):
    """(key, value) of a JSON document's scalar leaves worth copying (three characters or more)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, str(k))
    elif isinstance(obj, list):
        for v in obj:
            yield from _leaves(v, key)
    elif key is not None and isinstance(obj, (str, int, float)) and not isinstance(obj, bool) and len(str(obj)) >= 3:
        yield key, str(obj)


def _message_values(m: dict):
    """(key, value) pairs a message holds as data: a JSON tool result's leaves, its tool calls' arguments."""
    if m.get("role") == "tool" and isinstance(m.get("content"), str):
        try:
            yield from _leaves(json.loads(m["content"]))
        except (json.JSONDecodeError, RecursionError):
            pass
    for tc in m.get("tool_calls") or []:
        _, args = call_parts(tc)
        if isinstance(args, dict):
            yield from _leaves(args)


def copied_keys(examples: Sequence[tuple[Sequence[dict], Sequence[Any]]]) -> list[str]:
    """Keys whose values the LLM copies into its tool calls, from (prompt messages, the LLM's tool calls) pairs:
    a key counts as copied when its value in the prompt shows up among the call's argument values. The keys
    come most copied first (the share of the prompts showing the key whose value the call copied)."""
    seen: dict[str, int] = {}
    copied: dict[str, int] = {}
    for messages, calls in examples:
        wanted = {v for c in calls or [] for _, v in _leaves(c.arguments if isinstance(c.arguments, dict) else {})}
        if not wanted:
            continue
        pairs = {kv for m in messages for kv in _message_values(m)}
        for k, v in pairs:
            seen[k] = seen.get(k, 0) + 1
            if v in wanted:
                copied[k] = copied.get(k, 0) + 1
    keep = [k for k, n in copied.items() if n >= CARRY_MIN_COPIES and n / seen[k] >= CARRY_MIN_RATE]
    return sorted(keep, key=lambda k: (-copied[k] / seen[k], k))


def fit_recipe(prompts: Sequence[Sequence[dict]], *, enabled: bool = True, max_history_tokens: int = 1536,
               max_tool_result_chars: int = 2000, toolsets: Sequence[Any] | None = None,
               copy_examples: Sequence[tuple[Sequence[dict], Sequence[Any]]] | None = None,
               max_carried: int = 0, carry_calls: int = 0, carry_order: str = "recent") -> CompactionRecipe:
    """Decide a site's recipe from its calls' prompts (and their tool definitions); with `copy_examples`
    (training prompts and the LLM's tool calls) and `max_carried`, the keys whose values are carried;
    with `carry_calls`, how many of the tool calls the window drops are named; `carry_order`, which carried
    values come first."""
    from slmconvert.cluster.features import mask_variables

    if not enabled:
        return CompactionRecipe(max_history_tokens=10**9, max_tool_result_chars=10**9)
    templates = {mask_variables(_system_text(p)) for p in prompts}
    static = len(templates) == 1 and next(iter(templates)) != ""
    distinct_tools = {json.dumps(t, sort_keys=True) for t in (toolsets or []) if t}
    prefix = suffix = None
    if not static:
        prefix, suffix = shared_parts([_system_text(p) for p in prompts])
    return CompactionRecipe(drop_system_prompt=static, system_template=next(iter(templates)) if static else None,
                            max_history_tokens=max_history_tokens, max_tool_result_chars=max_tool_result_chars,
                            drop_tools=static and len(distinct_tools) == 1, system_prefix=prefix, system_suffix=suffix,
                            carry_keys=_carry_keys(copy_examples, carry_order) if copy_examples and max_carried else None,
                            max_carried=max_carried, carry_calls=carry_calls, carry_order=carry_order)


def _carry_keys(copy_examples, order: str) -> list[str] | None:
    keys = copied_keys(copy_examples)
    return (keys if order == "copied" else sorted(keys)) or None  # by name unless their order matters


def fit_site_recipe(cc, prompts: Sequence[Sequence[dict]], toolsets: Sequence[Any], train: Sequence[Any]) -> CompactionRecipe:
    """A site's recipe under the pipeline's `compaction` settings, from its calls' prompts and tool
    definitions and its training invocations (whose tool calls show which values the LLM copies)."""
    return fit_recipe(prompts, enabled=cc.enabled, max_history_tokens=cc.max_history_tokens,
                      max_tool_result_chars=cc.max_tool_result_chars, toolsets=toolsets,
                      copy_examples=[(i.request.messages, i.response.tool_calls) for i in train],
                      max_carried=cc.carry_values, carry_calls=cc.carry_calls, carry_order=cc.carry_order)


def shared_parts(texts: Sequence[str]) -> tuple[str | None, str | None]:
    """The head and tail all (non-empty) system prompts share, each cut back to a line or sentence end."""
    import os

    texts = list(dict.fromkeys(texts))
    if len(texts) < 2 or any(not t for t in texts):
        return None, None
    head = os.path.commonprefix(texts)
    if len(head) < min(map(len, texts)):  # not the whole of the shortest: cut back to a boundary
        cut = max(head.rfind(c) for c in _BOUNDARY_CHARS)
        head = head[: cut + 1] if cut >= 0 else ""
    rest = [t[len(head):] for t in texts]
    tail = os.path.commonprefix([r[::-1] for r in rest])[::-1]
    if len(tail) < min(map(len, rest)):  # not the whole of the shortest rest: start it at a line break
        cut = tail.find("\n")
        tail = tail[cut:] if cut >= 0 else ""
    head = head if len(head) >= MIN_SHARED_CHARS else ""
    tail = tail if len(tail) >= MIN_SHARED_CHARS else ""
    return head or None, tail or None


def _drop_shared(msgs: list[dict], head: str, tail: str) -> list[dict]:
    """The system prompt without the head and tail every variant of the site shares (what varies stays)."""
    i = next((k for k, m in enumerate(msgs) if m.get("role") == "system"), None)
    if i is None:
        return msgs
    text = (msgs[i].get("content") or "").strip()  # as fit_recipe saw it
    if not (text.startswith(head) and text.endswith(tail) and len(text) >= len(head) + len(tail)):
        return msgs  # a variant the site never showed: kept whole
    middle = text[len(head): len(text) - len(tail)].strip()
    return msgs[:i] + ([{**msgs[i], "content": middle}] if middle else []) + msgs[i + 1:]


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
    elif recipe.system_prefix or recipe.system_suffix:
        msgs = _drop_shared(msgs, recipe.system_prefix or "", recipe.system_suffix or "")
    system = [m for m in msgs if m.get("role") == "system"]
    rest = [m for m in msgs if m.get("role") != "system"]
    whole = [dict(m) for m in rest]  # before tool results are cut: where carried values are read
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
    return system + _carry(whole, kept, recipe)


def _call_text(tc: Any) -> str | None:
    """A tool call as `name(key=value, ...)`, each value cut to CALL_VALUE_CHARS."""
    name, args = call_parts(tc)
    if not name:
        return None
    if isinstance(args, dict):
        parts = []
        for k, v in args.items():
            v = " ".join((v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)).split())  # one line
            parts.append(f"{k}={v if len(v) <= CALL_VALUE_CHARS else v[:CALL_VALUE_CHARS] + '…'}")
        return f"{name}({', '.join(parts)})"
    text = "" if args in (None, "") else " ".join(str(args).split())
    return f"{name}({text if len(text) <= CALL_VALUE_CHARS else text[:CALL_VALUE_CHARS] + '…'})"


def _carry(whole: list[dict], kept: list[dict], recipe: CompactionRecipe) -> list[dict]:
    """The window with a note in front of what the history's dropped messages held: the tool calls they
    made (the most recent `carry_calls`, in order) and the carried values (as they were before any cut)
    that neither the window nor a named call shows, each once, most recent first (`carry_order` "copied":
    those of the most copied keys first, then the most recent)."""
    keys = set(recipe.carry_keys or ()) if recipe.max_carried > 0 else set()
    if not keys and recipe.carry_calls <= 0:
        return kept
    dropped = whole[: len(whole) - len(kept)]  # the window is a suffix of the history
    calls: list[str] = []
    if recipe.carry_calls > 0:
        calls = [t for m in dropped for tc in m.get("tool_calls") or [] if (t := _call_text(tc))][-recipe.carry_calls:]
    window = "\n".join(str(m.get("content") or "") + json.dumps(m.get("tool_calls") or "") for m in kept)
    window += "\n" + "\n".join(calls)
    values: list[str] = []
    seen: set[tuple[str, str]] = set()
    for m in reversed(whole):
        for k, v in _message_values(m):
            if k in keys and (k, v) not in seen and v not in window:
                seen.add((k, v))
                values.append(f"{k}={v}")
    if recipe.carry_order == "copied":  # the values of the keys the LLM copies most first (a stable sort: recency next)
        rank = {k: i for i, k in enumerate(recipe.carry_keys or ())}
        values.sort(key=lambda kv: rank[kv.split("=", 1)[0]])
    values = values[: recipe.max_carried]
    if not values and not calls:
        return kept
    if calls:
        note = CARRY_HEADER + "called " + "; ".join(calls) + (". Values seen: " + ", ".join(values) if values else "")
    else:
        note = CARRY_HEADER + ", ".join(values)
    if kept and kept[0].get("role") == "user" and isinstance(kept[0].get("content"), str):
        return [{**kept[0], "content": note + "\n\n" + kept[0]["content"]}] + kept[1:]
    return [{"role": "user", "content": note}] + kept
