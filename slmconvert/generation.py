"""Batched greedy generation with per-answer confidence (mean token log-probability)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

from slmconvert.progress import NULL_PROGRESS, Progress


@dataclass
class Generation:
    text: str
    new_tokens: int
    mean_logprob: float | None
    seconds: float  # this answer's share of its batch's wall time


def generate(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 256, batch_size: int = 8,
             max_prompt_tokens: int | None = None, progress: Progress = NULL_PROGRESS) -> list[Generation]:
    """Greedy answers, one per prompt, in input order. Prompts are batched by length (left padding)."""
    import torch

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if max_prompt_tokens is not None:
        tokenizer.truncation_side = "left"  # keep the end of the prompt: the turn to answer
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[Generation | None] = [None] * len(prompts)
    device = next(model.parameters()).device
    eos = [t for t in {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None} if t is not None]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False,
                        truncation=max_prompt_tokens is not None, max_length=max_prompt_tokens)
        enc = {k: v.to(device) for k, v in enc.items()}
        t = time.perf_counter()
        with torch.no_grad():
            res = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 eos_token_id=eos or None, pad_token_id=tokenizer.pad_token_id,
                                 output_scores=True, return_dict_in_generate=True)
        dt = time.perf_counter() - t
        new = res.sequences[:, enc["input_ids"].shape[1]:]
        scores = model.compute_transition_scores(res.sequences, res.scores, normalize_logits=True)
        for row, i in enumerate(idx):
            ids = new[row].tolist()
            n = len(ids)
            for j, tok in enumerate(ids):
                if tok in eos or tok == tokenizer.pad_token_id:
                    n = j + (1 if tok in eos else 0)
                    break
            lp = scores[row, :n].float()
            lp = lp[torch.isfinite(lp)]
            out[i] = Generation(text=tokenizer.decode(ids[:n], skip_special_tokens=True), new_tokens=n,
                                mean_logprob=float(lp.mean()) if len(lp) else None, seconds=dt / len(idx))
        progress.advance(len(idx))
    return out  # type: ignore[return-value]
