"""Throughput and footprint of `collect` on the τ-bench airline log (scrubbing off).

    python benchmarks/collect_speed.py [LOG] [--repeat 3]

Prints invocations/s and MB/s of the whole stage (parse, dedup, tool inference, Parquet
write) and the bytes the workspace takes on disk against the input. Targets (issue 2):
≥ 1,000 invocations/s on 2 cores, workspace ≤ input size.
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
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    import datasets  # noqa: F401  (import once, outside the timings: a CLI run pays it once too)

    from slmconvert.collect.stage import run
    from slmconvert.config import load_config
    from slmconvert.workspace import Workspace

    log = Path(args.log)
    size = log.stat().st_size
    best, result = None, None
    for _ in range(args.repeat):
        tmp = Path(tempfile.mkdtemp())
        cfg = load_config(None, [f"workspace={json.dumps(str(tmp / 'ws'))}", "scrub.enabled=false",
                                 f"collect.paths={json.dumps([str(log)])}"])
        ws = Workspace(cfg.workspace)
        t = time.perf_counter()
        m = run(cfg, ws)
        dt = time.perf_counter() - t
        disk = sum(p.stat().st_size for p in ws.root.rglob("*") if p.is_file())
        t = time.perf_counter()
        m2 = run(cfg, ws)
        skip_s = time.perf_counter() - t
        assert m2.skipped
        shutil.rmtree(tmp)
        if best is None or dt < best:
            best, result = dt, (m, disk, skip_s)
    m, disk, skip_s = result
    n = m.counts["invocations"]
    print(f"input            {log.name}: {size:,} bytes")
    print(f"invocations      {n:,} ({m.counts['tool_calls']:,} tool calls, {m.counts['sessions']:,} sessions)")
    print(f"stage time       {best:.3f} s  (best of {args.repeat}; " + ", ".join(f"{k}={v:.3f}" for k, v in m.timings.items()) + ")")
    print(f"throughput       {n / best:,.0f} invocations/s, {size / best / 1e6:.2f} MB/s")
    print(f"workspace        {disk:,} bytes on disk = {disk / size:.2f} x the input")
    print(f"unchanged re-run {skip_s:.3f} s (skipped)")


if __name__ == "__main__":
    main()
