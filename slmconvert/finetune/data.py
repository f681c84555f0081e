"""Training examples: each logged call becomes (prompt, completion) text in the model's own chat format.

The prompt is the compacted request rendered by the chat template; the completion is the LLM's
logged response rendered the same way, end-of-turn token included (sequence-level
distillation). A prompt/completion dataset makes trl compute the loss on the completion only.

With `finetune.history_loss` the loss also covers the LLM's earlier answers that the prompt's history
window shows (`earlier_turns`): the same tokens the model reads anyway, so one forward pass teaches
several calls at the cost of one. Such an example is tokenized here (`input_ids` + `completion_mask`).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

from slmconvert.chat import fit_messages, n_tokens, render_completion, render_conversation, render_prompt
from slmconvert.compaction import CompactionRecipe, compact, compact_tools
from slmconvert.invocation import Invocation


def end_at_eos(completion: str, tokenizer: Any) -> str:
    """Templates put a newline after the end-of-turn token; trl appends EOS to any completion that does
    not end with it, which would train a doubled end-of-turn. End the target at the token itself."""
    eos = tokenizer.eos_token
    trimmed = completion.rstrip()
    return trimmed if eos and trimmed.endswith(eos) else completion


def example_for(inv: Invocation, recipe: CompactionRecipe, tokenizer: Any, max_length: int,
                native: bool, stats: Counter | None = None,
                history_loss: bool = False) -> tuple[dict[str, Any] | None, str | None]:
    """(example, None) or (None, why it was dropped). The prompt is fitted into what `max_length` leaves (`fit_messages`)."""
    msgs = compact(inv.request.messages, recipe)
    tools = compact_tools(inv.request.tools, recipe)
    completion = end_at_eos(render_completion(tokenizer, msgs, tools, inv.response, native), tokenizer)
    c_len = n_tokens(tokenizer, completion)
    if c_len > max_length // 2:
        return None, "completion_too_long"
    fitted = fit_messages(msgs, tools, tokenizer, max_length - c_len, native, stats)
    if fitted is None:
        return None, "prompt_too_long"
    shown, shown_tools, prompt, p_len = fitted
    row = {"prompt": prompt, "completion": completion, "invocation_id": inv.id,
           "prompt_tokens": p_len, "completion_tokens": c_len}
    if history_loss:
        spans = earlier_turns(tokenizer, shown, shown_tools, native, prompt)
        ids, mask, starts = supervised_ids(tokenizer, prompt + completion, [*spans, (len(prompt), len(prompt) + len(completion))])
        row.update(input_ids=ids, completion_mask=mask, history_turns=len(spans),
                   history_tokens=sum(k for k, at in zip(mask, starts) if at < len(prompt)))
    return row, None


def earlier_turns(tokenizer: Any, messages: list[dict], tools: list[dict] | None, native: bool,
                  prompt: str) -> list[tuple[int, int]]:
    """Character spans, in `prompt`, of the assistant turns it shows, each from its first character through its
    end-of-turn token: the LLM's earlier answers, each rendered exactly as a completion of the history before it
    would be. A turn with no user message before it in the window (nothing it answers) is left out, and so is
    any turn of a template that rewrites earlier turns (no prefix property: the span would not be that answer)."""
    spans: list[tuple[int, int]] = []
    asked = False
    for i, m in enumerate(messages):
        role = m.get("role")
        if role == "user":
            asked = True
        if role != "assistant" or not asked:
            continue
        before = render_prompt(tokenizer, messages[:i], tools, native)
        through = render_conversation(tokenizer, messages[: i + 1], tools, native)
        if not (through.startswith(before) and prompt.startswith(through)):
            continue
        turn = end_at_eos(through[len(before):], tokenizer)
        if turn.strip():
            spans.append((len(before), len(before) + len(turn)))
    return spans


def supervised_ids(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int], list[int]]:
    """`text` tokenized as trl tokenizes a prompt and its completion: the ids, 1 for each token that starts inside
    a span (0 otherwise), and where each token starts in `text`."""
    ordered = sorted(spans)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, starts = list(enc["input_ids"]), [start for start, _ in enc["offset_mapping"]]
    else:  # no offsets from a slow tokenizer: each piece between span edges tokenized on its own
        edges = sorted({0, len(text), *(e for span in ordered for e in span)})
        ids, starts = [], []
        for a, b in zip(edges, edges[1:]):
            piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
            ids += piece
            starts += [a] * len(piece)
    mask, j = [], 0
    for start in starts:
        while j < len(ordered) and ordered[j][1] <= start:
            j += 1
        mask.append(int(j < len(ordered) and ordered[j][0] <= start))
    return ids, mask, starts


def build_examples(invocations: Sequence[Invocation], recipe: CompactionRecipe, tokenizer: Any, max_length: int,
                   native: bool, history_loss: bool = False) -> tuple[list[dict[str, Any]], dict[str, int]]:
    rows, dropped, fitted = [], Counter(), Counter()
    for inv in invocations:
        ex, why = example_for(inv, recipe, tokenizer, max_length, native, fitted, history_loss)
        if ex is None:
            dropped[why] += 1
        else:
            rows.append(ex)
    stats = {"examples": len(rows), "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
             "completion_tokens": sum(r["completion_tokens"] for r in rows),
             **{f"dropped_{k}": v for k, v in dropped.items()}, **{f"fitted_{k}": v for k, v in fitted.items()}}
    if history_loss:
        stats.update(history_turns=sum(r["history_turns"] for r in rows), history_tokens=sum(r["history_tokens"] for r in rows))
    return rows, stats
