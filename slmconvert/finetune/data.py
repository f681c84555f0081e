"""Training examples: each logged call becomes (prompt, completion) text in the model's own chat format.

The prompt is the compacted request rendered by the chat template; the completion is the LLM's
logged response rendered the same way, end-of-turn token included (sequence-level
distillation). A prompt/completion dataset makes trl compute the loss on the completion only.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

from slmconvert.chat import fit_prompt, n_tokens, render_completion
from slmconvert.compaction import CompactionRecipe, compact, compact_tools
from slmconvert.invocation import Invocation


def end_at_eos(completion: str, tokenizer: Any) -> str:
    """Templates put a newline after the end-of-turn token; trl appends EOS to any completion that does
    not end with it, which would train a doubled end-of-turn. End the target at the token itself."""
    eos = tokenizer.eos_token
    trimmed = completion.rstrip()
    return trimmed if eos and trimmed.endswith(eos) else completion


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
