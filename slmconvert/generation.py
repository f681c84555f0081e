"""Batched greedy generation with the log-probability of every generated token (the model's own, before
any grammar), optionally schema-constrained (slmconvert.constrained), with a guard against loops."""

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
    logprobs: list[float] | None = None  # per generated token, the model's log-probability of it (unconstrained)
    tokens: list[str] | None = None  # the generated tokens' texts, for signals over parts of the answer

    def as_dict(self) -> dict[str, Any]:
        return {"text": self.text, "new_tokens": self.new_tokens, "mean_logprob": self.mean_logprob,
                "logprobs": self.logprobs, "tokens": self.tokens}


class RawLogprobs:
    """A logits processor, first in line, that keeps the model's log-probability of each chosen token from the
    raw scores (before a grammar masks them), one vocabulary row at a time instead of every step's logits."""

    def __init__(self):
        self.prev = None
        self.steps: list[Any] = []

    def __call__(self, input_ids, scores):
        import torch

        if self.prev is not None:
            self.steps.append(self.prev.gather(1, input_ids[:, -1:]).squeeze(1))
        self.prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def collect(self, new_tokens):
        """(batch, generated) log-probabilities, given the generated token ids."""
        import torch

        if self.prev is not None and len(self.steps) < new_tokens.shape[1]:
            self.steps.append(self.prev.gather(1, new_tokens[:, len(self.steps):len(self.steps) + 1]).squeeze(1))
        self.prev = None
        return torch.stack(self.steps, dim=1) if self.steps else torch.zeros(new_tokens.shape[0], 0)


class RepeatGuard:
    """A logits processor, last in line, that breaks loops. Greedy decoding of a small model can fall into writing
    the same span again and again (the same passenger appended to a list until the token budget runs out inside
    the call: broken JSON). When a row's answer ends in the same span of p tokens written `copies` times in a row
    (a run of at least `min_span` tokens), the span's token-to-token steps are remembered for that row, and from
    then on a token that would take one of those steps again is banned, whatever the phase: the model (and the
    grammar) must go another way — close the list, end the string, stop. A row's last allowed token is never
    banned, so a grammar's answer stays valid.

    A counting loop is caught too (with `digits`, the tokenizer's digit tokens: `digit_tokens`): the same span
    with its numbers counting up by one ("28. The reservation ID is 12372. 29. The reservation ID is 12373. …"),
    which no verbatim check sees. Its numbers are read as one unit each; when the span has come
    `counting_copies` times in a row and a number at the same place in it went up by exactly one each time, the
    span's steps between tokens that are not digits are banned as above. A list whose items differ only in
    their numbers (flights, amounts) is not a counting loop unless one of its numbers counts, and it gets
    `counting_copies` items (five) before anything is banned."""

    VERSION = "repeat-v3"  # part of evaluate's generation cache key

    def __init__(self, copies: int = 3, min_span: int = 24, max_period: int = 64,
                 digits: dict[int, str] | None = None, counting_copies: int = 5):
        self.copies, self.min_span, self.max_period = copies, min_span, max_period
        self.digits, self.counting_copies = digits or {}, counting_copies
        self.start: int | None = None
        self.steps: dict[int, dict[int, set[int]]] = {}  # row -> token -> the tokens that followed it in a loop
        self.fired = 0
        self.counting = 0  # counting loops found (rows x times)
        self._units: dict[int, _Units] = {}  # row -> its answer so far as units, read one new token at a time

    def period(self, tail: list[int]) -> int | None:
        """The shortest period whose last `copies` repetitions end the sequence, spanning min_span or more."""
        return _shortest_period(tail, self.copies, self.min_span, self.max_period)

    def units(self, tail: list[int]) -> tuple[list[int], dict[int, int]]:
        """The tail with each run of digit tokens as one unit (-1), and the number each such unit holds (by unit index)."""
        state = _Units()
        state.extend(tail, self.digits)
        return state.close()

    def counting_period(self, tail: list[int]) -> list[int] | None:
        """The tokens of a counting loop's span (digit units as -1) when the tail ends in one, else None."""
        if tail and tail[-1] in self.digits:
            return None  # a number still being written: judge the span once it is whole
        units, numbers = self.units(tail)
        return self._counting(units, numbers)

    def _counting(self, units: list[int], numbers: dict[int, int]) -> list[int] | None:
        """The span of the shortest period the units repeat `counting_copies` times when a number in it counts up by one."""
        c = self.counting_copies
        p = _shortest_period(units, c, self.min_span, self.max_period)
        if p is None:
            return None
        first = len(units) - c * p
        for j in range(p):
            if units[first + j] != -1:
                continue
            vals = [numbers.get(first + j + k * p) for k in range(c)]
            if all(v is not None for v in vals) and all(b - a == 1 for a, b in zip(vals, vals[1:])):
                return units[-p:]
        return None  # the shortest period repeats, but nothing in it counts

    def __call__(self, input_ids, scores):
        import torch

        if self.start is None:
            self.start = input_ids.shape[1]
        gen = input_ids[:, self.start:]
        if gen.shape[1] < 2:
            return scores
        window = self.copies * self.max_period + self.min_span
        for row in range(gen.shape[0]):
            tail = gen[row, -window:].tolist()
            p = self.period(tail) if len(tail) >= self.min_span else None
            if p is not None:
                self._remember(row, tail[-p:])
            elif self.digits:
                state = self._units.setdefault(row, _Units())
                state.extend(gen[row, state.seen:].tolist(), self.digits)
                state.trim(2 * self.counting_copies * self.max_period)
                if tail[-1] not in self.digits:
                    cycle = self._counting(state.units, state.numbers)
                    if cycle is not None:
                        self.counting += 1
                        self._remember(row, cycle)
            for nxt in self.steps.get(row, {}).get(tail[-1], ()):
                if torch.isfinite(scores[row, nxt]) and torch.isfinite(scores[row]).sum() > 1:
                    scores[row, nxt] = float("-inf")
                    self.fired += 1
        return scores

    def _remember(self, row: int, cycle: list[int]) -> None:
        """The cycle's steps (its last token to its first included), except those to or from a number (-1)."""
        known = self.steps.setdefault(row, {})
        for k in range(len(cycle)):
            a, b = cycle[k - 1], cycle[k]
            if a != -1 and b != -1:
                known.setdefault(a, set()).add(b)


def _shortest_period(seq: list[int], copies: int, min_span: int, max_period: int) -> int | None:
    """The shortest period p (at most max_period) whose last `copies` repetitions end `seq`, spanning `min_span` or more."""
    n = len(seq)
    for p in range(1, max_period + 1):
        need = max(copies * p, min_span)
        if need > n:  # it only grows with p
            return None
        if seq[-1] != seq[-1 - p]:  # the cheap test first: the last item must come p back
            continue
        if all(seq[i] == seq[i + p] for i in range(n - need, n - p)):
            return p
    return None


class _Units:
    """An answer read as units (RepeatGuard.units) as it grows: tokens seen, units, each number unit's value, the number
    being written."""

    def __init__(self):
        self.seen, self.units, self.numbers, self.run = 0, [], {}, ""

    def extend(self, tokens: list[int], digits: dict[int, str]) -> None:
        self.seen += len(tokens)
        for t in tokens:
            d = digits.get(t)
            if d is not None:
                self.run += d
                continue
            if self.run:
                self._number()
            self.units.append(t)

    def _number(self) -> None:
        self.numbers[len(self.units)] = int(self.run[-18:])
        self.units.append(-1)
        self.run = ""

    def trim(self, keep: int) -> None:
        """Keep the last `keep` units (twice that held at most, so a trim is rare)."""
        if len(self.units) > 2 * keep:
            cut = len(self.units) - keep
            self.units = self.units[cut:]
            self.numbers = {i - cut: v for i, v in self.numbers.items() if i >= cut}

    def close(self) -> tuple[list[int], dict[int, int]]:
        if self.run:
            self._number()
        return self.units, self.numbers


def digit_tokens(tokenizer: Any) -> dict[int, str]:
    """The tokenizer's tokens that are a number's digits (with at most surrounding spaces): token id -> digits.
    Read once per tokenizer."""
    cached = getattr(tokenizer, "_slmconvert_digits", None)
    if cached is not None:
        return cached
    out: dict[int, str] = {}
    for i in range(len(tokenizer)):
        s = tokenizer.decode([i]).strip()
        if s.isascii() and s.isdigit():
            out[i] = s
    try:
        tokenizer._slmconvert_digits = out
    except AttributeError:  # a tokenizer that takes no attributes: read again next time
        pass
    return out


class WholeNameChoice:
    """A logits processor, after the grammar: where greedy decoding opens a tool call, the answer writes the offered
    tool whose whole opening (`<tool_call>{"name": "X"`, `name_tokens`) the model itself finds most probable
    (`choose_openings`), not the name greedy decoding reaches one token at a time. Token by token, greedy decoding
    goes into the group of names sharing a prefix (`update_reservation_…`) when their summed probability beats a
    single likelier name. Only the first call's opening is chosen; the arguments, and any text, are decoded greedily
    as before. A token the grammar forbids is never forced. Off by default (evaluate.tool_choice): on τ-bench it
    was no better than greedy decoding (README)."""

    VERSION = "whole-name-v1"  # part of evaluate's generation cache key

    def __init__(self, openings: Sequence[list[int] | None]):
        self.openings = list(openings)
        self.start: int | None = None

    def __call__(self, input_ids, scores):
        import torch

        if self.start is None:
            self.start = input_ids.shape[1]
        n = input_ids.shape[1] - self.start
        for row, opening in enumerate(self.openings):
            if opening is None or n == 0 or n >= len(opening):
                continue  # at the first token greedy itself decides between a tool call and a text reply
            if input_ids[row, self.start:].tolist() != opening[:n]:
                self.openings[row] = None  # this row went another way
                continue
            keep = opening[n]
            if not torch.isfinite(scores[row, keep]):
                self.openings[row] = None
                continue
            value = scores[row, keep].clone()
            scores[row] = float("-inf")
            scores[row, keep] = value
        return scores


def name_tokens(tokenizer: Any, name: str) -> list[int]:
    """The token ids that open a call to `name`, as the adapters were trained to write it, up to the first token that
    holds the name's closing quote: a token after it may merge with the arguments (` {"`), which greedy decoding
    writes on its own."""
    from slmconvert.constrained import name_text, opening_text

    upto = len(name_text(name))
    ids = tokenizer(opening_text(name), add_special_tokens=False)["input_ids"]
    for k in range(len(ids)):
        if len(tokenizer.decode(ids[:k + 1])) >= upto:
            return ids[:k + 1]
    return ids


def _cache_argument(model: Any) -> str:
    """The forward argument that takes a KV cache: `cache` in recent transformers, `past_key_values` before."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def choose_openings(model: Any, tokenizer: Any, enc: dict, names: Sequence[Sequence[str] | None]) -> list[list[int] | None]:
    """Per batch row, the token ids of the opening of the offered tool (`names`, None: no tools) the model finds
    most probable as a whole, for rows whose greedy first token opens a tool call; None elsewhere.

    One forward pass over the (left-padded) prompts, then one over each such row's candidate openings on a copy of
    its cached prompt. Scored on the model's own probabilities (before any grammar)."""
    import copy

    import torch

    out: list[list[int] | None] = [None] * len(names)
    rows = [r for r, n in enumerate(names) if n and len(set(n)) > 1]
    if not rows:
        return out
    mask = enc["attention_mask"]
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        first = model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    prompt_cache = getattr(first, "cache", None) or first.past_key_values  # transformers 5.x renamed it `cache`
    cache_arg = _cache_argument(model)
    step0 = torch.log_softmax(first.logits[:, -1].float(), dim=-1)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for r in rows:
        cands = [name_tokens(tokenizer, n) for n in dict.fromkeys(names[r])]
        top = int(step0[r].argmax())
        keep = [c for c in cands if c and c[0] == top]
        if len(keep) < 2:
            out[r] = keep[0] if keep else None
            continue
        width = max(len(c) for c in keep)
        ids = torch.tensor([c + [pad] * (width - len(c)) for c in keep], device=mask.device)
        cache = copy.deepcopy(prompt_cache)
        cache.batch_select_indices(torch.tensor([r] * len(keep), device=mask.device))
        m = torch.cat([mask[[r] * len(keep)], torch.ones(len(keep), width, dtype=mask.dtype, device=mask.device)], dim=1)
        p = (pos[r, -1] + 1 + torch.arange(width, device=mask.device)).unsqueeze(0).expand(len(keep), -1)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=m, position_ids=p, use_cache=False, **{cache_arg: cache}).logits
        lp = torch.log_softmax(logits.float(), dim=-1)
        totals = [float(step0[r, c[0]]) + sum(float(lp[i, j - 1, c[j]]) for j in range(1, len(c))) for i, c in enumerate(keep)]
        out[r] = keep[max(range(len(keep)), key=totals.__getitem__)]
        del cache, logits, lp
    return out


def generate(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 256, batch_size: int = 8,
             max_prompt_tokens: int | None = None, progress: Progress = NULL_PROGRESS,
             grammars: Any = None, constraints: Sequence[Any] | None = None,
             tool_names: Sequence[Sequence[str] | None] | None = None) -> list[Generation]:
    """Greedy answers, one per prompt, in input order. Prompts are batched by length (left padding).

    With `grammars` (slmconvert.constrained.ToolGrammars) and `constraints` (one compiled grammar or None
    per prompt), decoding follows each prompt's grammar. With `tool_names` (per prompt, the offered tools' names,
    or None), a tool call opens with the name the model finds most probable as a whole (`WholeNameChoice`)."""
    import torch

    from slmconvert.constrained import logits_processor

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
        lp = logits_processor(grammars, [constraints[i] for i in idx]) if grammars is not None and constraints else None
        t = time.perf_counter()
        choice = (WholeNameChoice(choose_openings(model, tokenizer, enc, [tool_names[i] for i in idx]))
                  if tool_names is not None else None)
        raw = RawLogprobs()  # the model's own probability of each chosen token: a grammar's mask does not make it certain
        with torch.no_grad():
            res = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 eos_token_id=eos or None, pad_token_id=tokenizer.pad_token_id,
                                 return_dict_in_generate=True,
                                 logits_processor=[raw] + ([lp] if lp is not None else []) + ([choice] if choice is not None else []) + [RepeatGuard(digits=digit_tokens(tokenizer))])
        dt = time.perf_counter() - t
        new = res.sequences[:, enc["input_ids"].shape[1]:]
        scores = raw.collect(new)
        for row, i in enumerate(idx):
            ids = new[row].tolist()
            n = len(ids)
            for j, tok in enumerate(ids):
                if tok in eos or tok == tokenizer.pad_token_id:
                    n = j + (1 if tok in eos else 0)
                    break
            row_lp = scores[row, :n]
            finite = row_lp[torch.isfinite(row_lp)]
            out[i] = Generation(text=tokenizer.decode(ids[:n], skip_special_tokens=True), new_tokens=n,
                                mean_logprob=float(finite.mean()) if len(finite) else None, seconds=dt / len(idx),
                                logprobs=[round(float(x), 4) for x in row_lp.tolist()],
                                tokens=[tokenizer.decode([t], skip_special_tokens=True) for t in ids[:n]])
        progress.advance(len(idx))
    return out  # type: ignore[return-value]
