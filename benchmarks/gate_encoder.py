"""The request gate's encoders: CPU per request and the gate they fit, float (torch, ONNX Runtime) vs int8 ONNX.

    HF_HUB_OFFLINE=1 python benchmarks/gate_encoder.py [--log PATH] [--repeats 3]

The prompting turn (slmconvert.policy.request_text: the user message or tool results that prompt a call) of every
call of a τ-bench-format log (`[{"traj": [messages...]}, ...]`), embedded one request at a time on one thread, as
serve's gate does, by the default embedding model (all-MiniLM-L6-v2 from its PyPI package): torch, ONNX Runtime
float (torch's vectors) and ONNX Runtime int8 (slmconvert.embeddings.OnnxEncoder). Prints the time per request
(median of `--repeats` passes over all texts) and the int8 vectors' cosine to torch's.

Then what the gate would do with each: conversations split in log order into references (the first half), calibration
(the next quarter) and test (the last quarter); per encoder, the references and the floor (split conformal, alpha
0.02, as evaluate fits it) from that encoder's own vectors; then the share of test requests each gate admits and
how many test requests the two gates decide differently. About 9 minutes here (3 passes of 2,654 turns per encoder).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

DEFAULT = Path(__file__).resolve().parents[1].parent / "shared/data/tau-bench-airline-gpt4o/gpt-4o-airline.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--log", default=str(DEFAULT))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=0.02)
    args = ap.parse_args()

    import numpy as np
    import torch

    from slmconvert.embeddings import DEFAULT_EMBEDDING_MODEL, Embedder, OnnxEncoder, _features
    from slmconvert.policy import conformal_floor, request_text

    torch.set_num_threads(1)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})  # one core, as serve's gate thread has
    convs = []
    for conv in json.loads(Path(args.log).read_text()):
        msgs = [{"role": m["role"], "content": m.get("content") or json.dumps(m.get("tool_calls"))} for m in conv["traj"]]
        convs.append([request_text(msgs[:k]) for k in range(2, len(msgs) + 1) if msgs[k - 1]["role"] in ("user", "tool")])
    texts = [t for c in convs for t in c]
    embedder = Embedder(DEFAULT_EMBEDDING_MODEL)
    float_onnx, why_f = OnnxEncoder.build(embedder)
    int8, why_q = OnnxEncoder.build(embedder, "int8")
    if float_onnx is None or int8 is None:
        raise SystemExit(f"ONNX Runtime encoders unavailable: {why_f if float_onnx is None else why_q}")
    encoders = {"torch": lambda ts: embedder.encode(ts), "onnx float": float_onnx.encode, "onnx int8": int8.encode}
    tokens = [int(n) for n in _features(embedder.load(), texts)["attention_mask"].sum(axis=1)]
    print(f"{len(texts)} prompting turns of {len(convs)} conversations ({Path(args.log).name}); tokens per turn p50 "
          f"{statistics.median(tokens):.0f}, mean {statistics.mean(tokens):.0f}, max {max(tokens)}; one request at a time, one thread, one core")
    vectors = {}
    for name, encode in encoders.items():
        encode(texts[:8])  # warm
        passes = []
        for _ in range(args.repeats):
            t = time.process_time()
            out = [encode([x])[0] for x in texts]
            passes.append((time.process_time() - t) * 1000 / len(texts))
        vectors[name] = np.vstack(out)
        print(f"  {name:10s}: {statistics.median(passes):6.2f} ms of CPU per request (passes: {', '.join(f'{p:.2f}' for p in passes)})")
    cos = (vectors["onnx int8"] * vectors["torch"]).sum(axis=1)
    print(f"  int8 vs torch cosine: min {cos.min():.4f}, p1 {np.percentile(cos, 1):.4f}, median {np.median(cos):.4f}; "
          f"onnx float vs torch: largest component difference {np.abs(vectors['onnx float'] - vectors['torch']).max():.1g}")

    n = len(convs)
    parts = {"ref": range(0, n // 2), "cal": range(n // 2, 3 * n // 4), "test": range(3 * n // 4, n)}
    index, at = {}, 0
    for i, c in enumerate(convs):
        index[i] = list(range(at, at + len(c)))
        at += len(c)
    rows = {k: [j for i in r for j in index[i]] for k, r in parts.items()}
    admitted = {}
    for name in ("torch", "onnx int8"):
        v = vectors[name]
        ref = v[rows["ref"]].astype(np.float16).astype(np.float32)  # as Familiarity keeps them
        score = lambda idx: (v[idx] @ ref.T).max(axis=1)  # noqa: E731
        floor, bound = conformal_floor([float(x) for x in score(rows["cal"])], args.alpha)
        admitted[name] = score(rows["test"]) >= floor
        print(f"  gate fitted with {name:9s} vectors: floor {floor:.4f} (on {len(rows['cal'])} calibration requests, "
              f"familiar turned away at most {bound:.3f}); admits {admitted[name].mean():.1%} of {len(rows['test'])} test requests")
    differ = int((admitted["torch"] != admitted["onnx int8"]).sum())
    print(f"  the two gates decide {differ} of {len(rows['test'])} test requests differently")


if __name__ == "__main__":
    main()
