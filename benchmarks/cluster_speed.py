"""Embedding throughput and caching of `cluster` on the τ-bench airline log.

    HF_HUB_OFFLINE=1 python benchmarks/cluster_speed.py [LOG] [--limit N]

Prints, in one run on the same texts and the same model settings (all-MiniLM-L6-v2 from its
PyPI package, max_seq_length as configured, batch 64):
  - raw `SentenceTransformer.encode` texts/s (model already loaded),
  - the stage's embedding texts/s (model load included: the stage pays it),
  - the ratio (target >= 0.9),
  - the whole stage's first run and a second, forced run whose embeddings come from the
    cache (target: >= 10x faster), and an unchanged re-run (skipped).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

DEFAULT = Path(__file__).resolve().parents[1].parent / "shared/data/tau-bench-airline-gpt4o/gpt-4o-airline.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("log", nargs="?", default=str(DEFAULT))
    ap.add_argument("--limit", type=int, default=0, help="Use only the first N lines/records (0: all).")
    args = ap.parse_args()

    from slmconvert.cluster import features as F
    from slmconvert.cluster.stage import run
    from slmconvert.collect.stage import run as collect
    from slmconvert.config import load_config
    from slmconvert.embeddings import Embedder
    from slmconvert.store import load_invocations
    from slmconvert.workspace import Workspace

    tmp = Path(tempfile.mkdtemp())
    log = Path(args.log)
    if args.limit:
        data = json.loads(log.read_text())
        log = tmp / log.name
        log.write_text(json.dumps(data[: args.limit]))
    cfg = load_config(None, [f"workspace={json.dumps(str(tmp / 'ws'))}", "scrub.enabled=false",
                             f"collect.paths={json.dumps([str(log)])}"])
    ws = Workspace(cfg.workspace)
    collect(cfg, ws)
    invocations = load_invocations(ws)
    texts = list(dict.fromkeys([F.invocation_text(i) for i in invocations]
                               + sorted({F.request_template(i.request.messages) for i in invocations})))

    cc = cfg.cluster
    raw = Embedder(cc.embedding_model, cc.batch_size, cc.device, cc.max_seq_length).load()
    raw.encode(texts[:64], batch_size=cc.batch_size)  # warm-up
    t = time.perf_counter()
    raw.encode(texts, batch_size=cc.batch_size, normalize_embeddings=True, show_progress_bar=False)
    raw_s = time.perf_counter() - t
    del raw

    t = time.perf_counter()
    first = run(cfg, ws)
    first_s = time.perf_counter() - t
    t = time.perf_counter()
    second = run(cfg, ws, force=True)
    second_s = time.perf_counter() - t
    t = time.perf_counter()
    third = run(cfg, ws)
    skip_s = time.perf_counter() - t
    assert second.counts["embedded_new"] == 0 and third.skipped
    shutil.rmtree(tmp)

    n = first.counts["embedded_new"]
    stage_rate, raw_rate = n / first.timings["embed_s"], len(texts) / raw_s
    print(f"invocations        {first.counts['invocations']:,}; distinct texts embedded {n:,} (raw run: {len(texts):,})")
    print(f"model              {cc.embedding_model} (max_seq_length {cc.max_seq_length}, batch {cc.batch_size})")
    print(f"raw encode         {raw_rate:,.1f} texts/s ({raw_s:.1f} s)")
    print(f"stage embedding    {stage_rate:,.1f} texts/s ({first.timings['embed_s']:.1f} s, model load included)")
    print(f"ratio stage/raw    {stage_rate / raw_rate:.2f}  (target >= 0.9)")
    print(f"first run          {first_s:.1f} s  (" + ", ".join(f"{k}={v:.2f}" for k, v in first.timings.items()) + ")")
    print(f"second run, cached {second_s:.1f} s  -> {first_s / second_s:.1f}x faster (target >= 10x)  ("
          + ", ".join(f"{k}={v:.2f}" for k, v in second.timings.items()) + ")")
    print(f"unchanged re-run   {skip_s:.2f} s (skipped)")


if __name__ == "__main__":
    main()
