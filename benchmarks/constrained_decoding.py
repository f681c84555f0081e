"""What schema-constrained decoding costs per token, and what it changes, on real requests.

    HF_HUB_OFFLINE=1 python benchmarks/constrained_decoding.py [--calls 24] [--max-new-tokens 96]

SmolLM2-135M-Instruct (untrained) answers τ-bench tool-call requests (the airline agent's 14 tools and
their schemas, described in the prompt; the last 6 messages), greedy, batch 4, once freely and once with
the grammar (slmconvert.constrained). Prints tokens/s and milliseconds per token for both, the grammar's
compile time, and how many tool calls named a tool the request did not offer or failed its schema
(jsonschema), or were broken JSON, free vs constrained. The effect on a trained adapter is in
`evaluate`'s own numbers (valid JSON, invented tool names) with evaluate.constrained_decoding on and off.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

TAU = Path(__file__).resolve().parents[1].parent / "shared/data/tau-bench-airline-gpt4o/gpt-4o-airline.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--log", default=str(TAU))
    ap.add_argument("--calls", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args()

    import random
    import tempfile

    from slmconvert.chat import parse_completion, render_prompt, special_tokens
    from slmconvert.collect.stage import run as collect
    from slmconvert.config import load_config
    from slmconvert.constrained import ToolGrammars
    from slmconvert.generation import generate
    from slmconvert.models.loading import load_model, resolve_model
    from slmconvert.policy import invalid_reason
    from slmconvert.store import load_invocations
    from slmconvert.workspace import Workspace

    ws = Path(tempfile.mkdtemp()) / "ws"
    cfg = load_config(None, [f"workspace={json.dumps(str(ws))}", f"collect.paths={json.dumps([args.log])}", "scrub.enabled=false"])
    collect(cfg, Workspace(ws))
    invs = [i for i in load_invocations(Workspace(ws), "collect") if i.request.tools and i.response.tool_calls]
    invs = random.Random(0).sample(invs, min(args.calls, len(invs)))
    model, tok, _ = load_model(resolve_model("smollm2-135m-instruct"), device="cpu")
    prompts = [render_prompt(tok, i.request.messages[-6:], i.request.tools, False) for i in invs]
    t = time.perf_counter()
    grammars = ToolGrammars(tok, model.config.vocab_size)
    compiled = [grammars.for_tools(i.request.tools) for i in invs]
    compile_s = time.perf_counter() - t
    out = {"calls": len(invs), "grammar_compile_s": round(compile_s, 3), "distinct_tool_sets": len({id(c) for c in compiled})}
    for name, kw in (("free", {}), ("constrained", {"grammars": grammars, "constraints": compiled})):
        t = time.perf_counter()
        gens = generate(model, tok, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                        max_prompt_tokens=4096, **kw)
        dt = time.perf_counter() - t
        toks = sum(g.new_tokens for g in gens)
        calls = bad = broken = 0
        for g, inv in zip(gens, invs):
            resp, ok = parse_completion(g.text, special_tokens(tok))
            broken += not ok
            calls += bool(resp.tool_calls)
            bad += bool(resp.tool_calls) and invalid_reason(resp, inv.request.tools) is not None
        out[name] = {"seconds": round(dt, 1), "new_tokens": toks, "tokens_per_s": round(toks / dt, 1),
                     "ms_per_token": round(1000 * dt / max(toks, 1), 1), "tool_calls": calls,
                     "invalid_tool_calls": bad, "broken_json": broken}
    out["overhead_ms_per_token"] = round(out["constrained"]["ms_per_token"] - out["free"]["ms_per_token"], 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
