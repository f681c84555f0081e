"""SmolLM2-135M-Instruct distilled from the τ-bench airline agent's gpt-4o calls: base vs fine-tuned.

    HF_HUB_OFFLINE=1 python benchmarks/distill_taubench.py [--train-examples 600] [--epochs 2] [--test-calls 120]

Runs collect (scrubbed) → cluster → finetune on the train sessions, then scores the test sessions'
tool calls with `evaluate`'s metrics (function-name accuracy, BFCL-style argument accuracy) and
text replies (chrF), for the base model (full instructions and tool schemas in the prompt, as an
untrained model needs) and for the adapter (the site's compacted prompt, as it was trained).
Targets (issue 6): function name >= 0.80, arguments >= 0.60, >= 40 points above the base model.

Runtime on 2 CPU cores: about 195 training tokens/s; the defaults (600 examples x 2 epochs of
~700 tokens, then 2 x 120 generations) take roughly 1.5-2 hours. `--train-examples 200 --epochs 1
--test-calls 40` takes about 25 minutes. On a GPU, add `--device cuda`: minutes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

DEFAULT = Path(__file__).resolve().parents[1].parent / "shared/data/tau-bench-airline-gpt4o/gpt-4o-airline.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--log", default=str(DEFAULT))
    ap.add_argument("--workspace", default=None)
    ap.add_argument("--train-examples", type=int, default=600)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--test-calls", type=int, default=120)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()

    from peft import PeftModel

    from slmconvert.chat import parse_completion, render_prompt, supports_native_tools
    from slmconvert.cluster.stage import load_assignments, run as cluster
    from slmconvert.collect.stage import run as collect
    from slmconvert.compaction import CompactionRecipe, compact, compact_tools
    from slmconvert.config import load_config
    from slmconvert.finetune.stage import run as finetune
    from slmconvert.generation import generate
    from slmconvert.metrics import Prediction, score
    from slmconvert.models.catalogue import load_catalogue
    from slmconvert.models.loading import load_model
    from slmconvert.select.stage import probe_messages
    from slmconvert.store import load_invocations
    from slmconvert.workspace import Workspace

    ws_path = args.workspace or str(Path(tempfile.mkdtemp()) / "ws")
    sets = [f"workspace={json.dumps(ws_path)}", f"collect.paths={json.dumps([args.log])}", "collect.model=gpt-4o",
            "finetune.models=[smollm2-135m-instruct]", f"finetune.max_train_examples={args.train_examples}",
            f"finetune.epochs={args.epochs}", "finetune.max_length=1536"]
    if args.device:
        sets.append(f"finetune.device={args.device}")
    cfg = load_config(None, sets)
    ws = Workspace(ws_path)
    t0 = time.perf_counter()
    collect(cfg, ws)
    cluster(cfg, ws)
    m = finetune(cfg, ws)
    [adapter] = m.extra["adapters"]
    train_s = time.perf_counter() - t0
    by_id = {i.id: i for i in load_invocations(ws)}
    test = [by_id[a["invocation_id"]] for a in load_assignments(ws) if a["split"] == "test"]
    test = sorted(test, key=lambda i: i.id)[: args.test_calls]
    recipe = CompactionRecipe.from_dict(json.loads((ws.root / adapter["path"] / "recipe.json").read_text()))

    device = args.device or "cpu"
    base, tok, _ = load_model(load_catalogue().get("smollm2-135m-instruct"), device=device)
    native = supports_native_tools(tok)
    specials = [tok.eos_token, tok.pad_token]
    results = {}
    for name in ("base", "fine-tuned"):
        if name == "base":
            model = base
            prompts = [render_prompt(tok, probe_messages(i, recipe, []), i.request.tools, native) for i in test]
        else:
            model = PeftModel.from_pretrained(base, str(ws.root / adapter["path"] / "adapter")).eval()
            prompts = [render_prompt(tok, compact(i.request.messages, recipe), compact_tools(i.request.tools, recipe), native) for i in test]
        gens = generate(model, tok, prompts, max_new_tokens=160, batch_size=8, max_prompt_tokens=2048)
        agg = defaultdict(list)
        for inv, g in zip(test, gens):
            resp, ok = parse_completion(g.text, specials)
            for k, v in score(inv.response, Prediction(resp, ok, g.text), inv.request.tools).items():
                if v is not None:
                    agg[k].append(v)
        results[name] = {k: round(sum(v) / len(v), 3) for k, v in agg.items()}
        results[name]["n_tool_calls"] = len(agg["function_name"])
    print(f"train: {adapter['examples']} examples, loss {adapter['first_loss']} -> {adapter['last_loss']}, "
          f"{adapter['tokens_per_s']} tokens/s; collect+cluster+finetune {train_s / 60:.1f} min")
    print(f"test: {len(test)} calls ({results['base']['n_tool_calls']} tool calls)")
    for k in ("function_name", "arguments", "call_agreement", "valid_json", "chrf", "rouge_l"):
        b, f = results["base"].get(k), results["fine-tuned"].get(k)
        print(f"  {k:15s} base {b if b is not None else '—':>6}   fine-tuned {f if f is not None else '—':>6}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
