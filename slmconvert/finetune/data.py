"""Training examples: each logged call becomes (prompt, completion) text in the model's own chat format.

The prompt is the compacted request rendered by the chat template; the completion is the LLM's
logged response rendered the same way, end-of-turn token included (sequence-level
distillation). A prompt/completion dataset makes trl compute the loss on the completion only.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

from slmconvert.chat import render_completion, render_prompt
from slmconvert.compaction import CompactionRecipe, compact, compact_tools
from slmconvert.invocation import Invocation


def n_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def end_at_eos(completion: str, tokenizer: Any) -> str:
    """Templates put a newline after the end-of-turn token; trl appends EOS to any completion that does
    not end with it, which would train a doubled end-of-turn. End the target at the token itself."""
    eos = tokenizer.eos_token
    trimmed = completion.rstrip()
    return trimmed if eos and trimmed.endswith(eos) else completion


def _keep_carried(dropped: dict, after: list[dict]) -> list[dict]:
    """The messages after a dropped one, the dropped one's carried values (slmconvert.compaction) moved onto
    the next user message: they are what the prompt keeps of the history it no longer shows."""
    from slmconvert.compaction import CARRY_HEADER

    content = dropped.get("content")
    if not (isinstance(content, str) and content.startswith(CARRY_HEADER)):
        return after
    note = content.split("\n\n", 1)[0]
    nxt = next((i for i, m in enumerate(after) if m.get("role") == "user" and isinstance(m.get("content"), str)), None)
    if nxt is None:
        return after
    return after[:nxt] + [{**after[nxt], "content": note + "\n\n" + after[nxt]["content"]}] + after[nxt + 1:]


def fit_prompt(messages: list[dict], tools: list[dict] | None, tokenizer: Any, budget: int,
               native: bool, stats: Counter | None = None) -> tuple[str, int] | None:
    """The rendered prompt and its token count, fitted into `budget` tokens. Training, evaluation and
    serving share it, so a call is cut the same way everywhere.

    1. Older non-system turns are dropped (the last message always stays; values compaction carried
       move on to the next message).
    2. Still too long (long instructions, a huge last tool result): the longest message is cut in
       its middle, its head and tail kept with a marker saying how much was cut.
    3. Still too long: the tool descriptions are dropped (names and parameters stay).
    None only when even that does not fit. `stats` counts what was done (history_windowed,
    message_cut, tool_docs_dropped).
    """
    msgs = list(messages)
    prompt = render_prompt(tokenizer, msgs, tools, native)
    p_len = n_tokens(tokenizer, prompt)
    done: set[str] = set()
    while p_len > budget:
        droppable = [i for i, m in enumerate(msgs) if m.get("role") != "system"]
        if len(droppable) <= 1:
            break
        msgs = msgs[: droppable[0]] + _keep_carried(msgs[droppable[0]], msgs[droppable[0] + 1:])
        done.add("history_windowed")
        prompt = render_prompt(tokenizer, msgs, tools, native)
        p_len = n_tokens(tokenizer, prompt)
    for _ in range(6):
        if p_len <= budget:
            break
        i = max(range(len(msgs)), key=lambda k: len(msgs[k].get("content") or ""))
        content = msgs[i].get("content") or ""
        chars_per_token = max(len(prompt) / max(p_len, 1), 1.0)
        keep = len(content) - int((p_len - budget + 24) * chars_per_token * 1.15)
        if keep < 80:
            break
        head = keep * 2 // 3
        cut = len(content) - keep
        msgs[i] = {**msgs[i], "content": f"{content[:head]} …[{cut} characters cut]… {content[len(content) - (keep - head):]}"}
        done.add("message_cut")
        prompt = render_prompt(tokenizer, msgs, tools, native)
        p_len = n_tokens(tokenizer, prompt)
    if p_len > budget and tools:
        tools = [{**t, "function": {k: v for k, v in t["function"].items() if k != "description"}} for t in tools]
        done.add("tool_docs_dropped")
        prompt = render_prompt(tokenizer, msgs, tools, native)
        p_len = n_tokens(tokenizer, prompt)
    if stats is not None:
        stats.update(done)
    return (prompt, p_len) if p_len <= budget else None


def example_for(inv: Invocation, recipe: CompactionRecipe, tokenizer: Any, max_length: int,
                native: bool, stats: Counter | None = None) -> tuple[dict[str, Any] | None, str | None]:
    """(example, None) or (None, why it was dropped). The prompt is fitted into what `max_length` leaves (`fit_prompt`)."""
    msgs = compact(inv.request.messages, recipe)
    tools = compact_tools(inv.request.tools, recipe)
    completion = end_at_eos(render_completion(tokenizer, msgs, tools, inv.response, native), tokenizer)
    c_len = n_tokens(tokenizer, completion)
    if c_len > max_length // 2:
        return None, "completion_too_long"
    fitted = fit_prompt(msgs, tools, tokenizer, max_length - c_len, native, stats)
    if fitted is None:
        return None, "prompt_too_long"
    prompt, p_len = fitted
    return {"prompt": prompt, "completion": completion, "invocation_id": inv.id,
            "prompt_tokens": p_len, "completion_tokens": c_len}, None


def build_examples(invocations: Sequence[Invocation], recipe: CompactionRecipe, tokenizer: Any, max_length: int,
                   native: bool) -> tuple[list[dict[str, Any]], dict[str, int]]:
    rows, dropped, fitted = [], Counter(), Counter()
    for inv in invocations:
        ex, why = example_for(inv, recipe, tokenizer, max_length, native, fitted)
        if ex is None:
            dropped[why] += 1
        else:
            rows.append(ex)
    stats = {"examples": len(rows), "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
             "completion_tokens": sum(r["completion_tokens"] for r in rows),
             **{f"dropped_{k}": v for k, v in dropped.items()}, **{f"fitted_{k}": v for k, v in fitted.items()}}
    return rows, stats
