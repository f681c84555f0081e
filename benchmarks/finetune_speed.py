"""Training throughput of `finetune` against a plain SFTTrainer run on the same τ-bench calls.

    HF_HUB_OFFLINE=1 python benchmarks/finetune_speed.py [--examples 16] [--batch 4]

Same model (SmolLM2-135M-Instruct from its PyPI package), same calls (the first N train-split
calls of a fixed τ-bench subset), same LoRA settings, one epoch each, each run in its own
process (clean peak memory):
  - ours: the site's prompt compaction (static system prompt and tool schemas dropped, history
    windowed, long tool results cut) and length-grouped batches;
  - plain: the full prompt (system prompt + tool schemas + whole history), random batches.
Both use activation checkpointing (trl's default, and ours): without it neither fits in 24 GB on CPU.
Prints examples/s, tokens/s and peak RSS of each, and the speed-up (target >= 2x).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT = Path(__file__).resolve().parents[1].parent / "shared/data/tau-bench-airline-gpt4o/gpt-4o-airline.json"


def child(mode: str, n: int, batch: int, out: str) -> None:
    from datasets import Dataset
    from trl import SFTTrainer

    from slmconvert.chat import supports_native_tools
    from slmconvert.compaction import CompactionRecipe, fit_recipe
    from slmconvert.config import FinetuneConfig
    from slmconvert.finetune.data import build_examples
    from slmconvert.finetune.trainer import sft_config, train_adapter
    from slmconvert.models.catalogue import load_catalogue
    from slmconvert.models.loading import load_model
    from slmconvert.store import load_invocations
    from slmconvert.workspace import Workspace

    ws = Workspace(Path(out).parent / "ws")
    invs = sorted(load_invocations(ws), key=lambda i: i.id)
    recipe = fit_recipe([i.request.messages for i in invs], toolsets=[i.request.tools for i in invs]) if mode == "ours" \
        else CompactionRecipe(max_history_tokens=10**9, max_tool_result_chars=10**9)
    model, tok, _ = load_model(load_catalogue().get("smollm2-135m-instruct"), dtype="float32", for_training=True)
    fc = FinetuneConfig(epochs=1, batch_size=batch, max_length=8192, checkpoint_steps=10**6)
    rows, stats = build_examples(invs[:n], recipe, tok, fc.max_length, supports_native_tools(tok),
                                 fc.history_loss and mode == "ours")  # plain: the answer-only loss
    t = time.perf_counter()
    if mode == "ours":
        res = train_adapter(model, tok, rows, Path(out).parent / mode, fc, device="cpu", target_modules=None)
    else:
        from slmconvert.finetune.trainer import lora_config

        args, _ = sft_config(fc, Path(out).parent / mode, "cpu", len(rows))
        args.train_sampling_strategy = "random"
        trainer = SFTTrainer(model=model, args=args, processing_class=tok, peft_config=lora_config(fc, None),
                             train_dataset=Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]))
        trainer.train()
        res = {"tokens_seen": trainer.state.num_input_tokens_seen}
    dt = time.perf_counter() - t
    json.dump({"mode": mode, "examples": len(rows), "seconds": dt, "tokens": int(res["tokens_seen"]),
               "prompt_tokens": stats["prompt_tokens"], "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6},
              open(out, "w"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--log", default=str(DEFAULT))
    ap.add_argument("--examples", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--modes", default="plain,ours", help="Which runs (comma-separated).")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.examples, args.batch, args.child[1])
        return
    from slmconvert.collect.stage import run as collect
    from slmconvert.config import load_config
    from slmconvert.workspace import Workspace

    tmp = Path(tempfile.mkdtemp())
    data = json.loads(Path(args.log).read_text())[:20]  # a fixed subset: the first 20 conversations
    (tmp / "subset.json").write_text(json.dumps(data))
    cfg = load_config(None, [f"workspace={json.dumps(str(tmp / 'ws'))}", "scrub.enabled=false",
                             f"collect.paths={json.dumps([str(tmp / 'subset.json')])}"])
    collect(cfg, Workspace(cfg.workspace))
    results = {}
    for mode in args.modes.split(","):
        out = tmp / f"{mode}.json"
        subprocess.run([sys.executable, __file__, "--examples", str(args.examples), "--batch", str(args.batch),
                        "--child", mode, str(out)], check=True)
        results[mode] = json.loads(out.read_text())
    for mode, r in results.items():
        print(f"{mode:6s} {r['examples']} examples in {r['seconds']:.1f} s: {r['examples'] / r['seconds']:.3f} examples/s, "
              f"{r['tokens'] / r['seconds']:.0f} tokens/s ({r['tokens']:,} tokens trained, prompts {r['prompt_tokens']:,} tokens), "
              f"peak RSS {r['peak_rss_gb']:.2f} GB")
    if len(results) < 2:
        return
    speed = (results["ours"]["examples"] / results["ours"]["seconds"]) / (results["plain"]["examples"] / results["plain"]["seconds"])
    print(f"speed-up (examples/s, ours / plain): {speed:.1f}x  (target >= 2x)")


if __name__ == "__main__":
    main()
