"""Throughput and footprint of `collect` (scrubbing off).

    python benchmarks/collect_speed.py [LOG] [--repeat 3]     # the τ-bench airline log
    python benchmarks/collect_speed.py --formats [--sessions 400]
    python benchmarks/collect_speed.py --big-array 1.0        # a generated JSON array of >= 1 GB

Prints invocations/s and MB/s of the whole stage (parse, dedup, tool inference, Parquet
write) and the bytes the workspace takes on disk against the input. Targets (issue 2):
≥ 1,000 invocations/s on 2 cores, workspace ≤ input size.

`--formats` writes the demo agent's calls in every format `demo-data` knows (the same calls
as chat completions, Anthropic and Responses bodies, OTLP spans, Langfuse, LiteLLM,
LangSmith) and times `collect` on each (target, issue 18: ≥ 1,000 invocations/s each).
`--big-array GB` writes one JSON array of request/response records of at least GB gigabytes
and collects it in a child process, printing its peak RSS (target: < 500 MB: the array is
streamed and invocations are written in batches, never held whole).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

DEFAULT = Path(__file__).resolve().parents[1].parent / "shared/data/tau-bench-airline-gpt4o/gpt-4o-airline.json"


def _collect_once(log: Path, ws: Path):
    from slmconvert.collect.stage import run
    from slmconvert.config import load_config
    from slmconvert.workspace import Workspace

    cfg = load_config(None, [f"workspace={json.dumps(str(ws))}", "scrub.enabled=false", f"collect.paths={json.dumps([str(log)])}"])
    t = time.perf_counter()
    m = run(cfg, Workspace(cfg.workspace))
    return m, time.perf_counter() - t


def formats(sessions: int) -> None:
    import datasets  # noqa: F401  (imported once, outside the timings)

    from slmconvert.demo import generate
    from slmconvert.demo.generator import FORMATS

    tmp = Path(tempfile.mkdtemp())
    print(f"{'format':18} {'records':>8} {'calls':>7} {'MB':>6} {'seconds':>8} {'invocations/s':>14}")
    for fmt in [f for f in FORMATS if f != "shapes"]:
        log = tmp / f"{fmt}.jsonl"
        generate(log, sessions=sessions, seed=1, fmt=fmt)
        m, dt = _collect_once(log, tmp / f"ws-{fmt}")
        n = m.counts["invocations"]
        records = sum(1 for _ in open(log))
        print(f"{fmt:18} {records:>8,} {n:>7,} {log.stat().st_size / 1e6:>6.1f} {dt:>8.2f} {n / dt:>14,.0f}  ({', '.join(m.extra['formats'])})")
    shutil.rmtree(tmp)


def big_array(gb: float) -> None:
    import resource
    import subprocess
    import sys

    from slmconvert.demo import generate

    tmp = Path(tempfile.mkdtemp())
    src, log = tmp / "chunk.jsonl", tmp / "big.json"
    target = int(gb * 1e9)
    t = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        out.write("[\n")
        seed, first = 0, True
        while out.tell() < target:
            generate(src, sessions=2000, seed=seed)
            with open(src, encoding="utf-8") as fh:
                for line in fh:
                    out.write(("" if first else ",\n") + line.rstrip("\n"))
                    first = False
            seed += 1
        out.write("\n]\n")
    size = log.stat().st_size
    print(f"input            {log.name}: {size / 1e9:.2f} GB JSON array (written in {time.perf_counter() - t:.0f} s)")
    code = ("import json, sys, time; sys.path.insert(0, %r); from benchmarks.collect_speed import _collect_once; from pathlib import Path; "
            "m, dt = _collect_once(Path(sys.argv[1]), Path(sys.argv[2])); "
            "print(json.dumps({'n': m.counts['invocations'], 'q': m.counts['quarantined'], 's': dt, 'timings': m.timings}))")
    code = code % str(Path(__file__).resolve().parents[1])
    r = subprocess.run([sys.executable, "-c", code, str(log), str(tmp / "ws")], capture_output=True, text=True)
    if r.returncode:
        print(r.stderr[-3000:])
        raise SystemExit(r.returncode)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    disk = sum(p.stat().st_size for p in (tmp / "ws").rglob("*") if p.is_file())
    print(f"invocations      {res['n']:,} ({res['q']} quarantined)")
    print(f"stage time       {res['s']:.1f} s: {res['n'] / res['s']:,.0f} invocations/s, {size / res['s'] / 1e6:.1f} MB/s  "
          + ", ".join(f"{k}={v:.1f}" for k, v in res["timings"].items()))
    print(f"peak RSS         {peak:,.0f} MB (the collecting process; target < 500 MB)")
    print(f"workspace        {disk / 1e6:,.0f} MB on disk = {disk / size:.2f} x the input")
    shutil.rmtree(tmp)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("log", nargs="?", default=str(DEFAULT))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--formats", action="store_true", help="throughput per log format on the demo agent's calls")
    ap.add_argument("--sessions", type=int, default=400, help="demo sessions per format for --formats")
    ap.add_argument("--big-array", type=float, default=None, metavar="GB", help="peak memory on a generated JSON array of GB gigabytes")
    args = ap.parse_args()
    if args.formats:
        formats(args.sessions)
        return
    if args.big_array:
        big_array(args.big_array)
        return

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
