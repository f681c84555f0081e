"""`collect` (parse + scrub + write) at 10k / 100k / 1M calls: `engine: local` vs `engine: ray`, side by side.

    python benchmarks/scale.py                       # 10k and 100k calls, both engines
    python benchmarks/scale.py --sizes 10000 100000 1000000 --engines local ray
    python benchmarks/scale.py --sizes 10000 --no-scrub --set collect.partition_mb=8

The logs are the demo generator's (`slmconvert demo-data`, request-response, many sessions; ~2.7 calls
per session). Each run is a fresh `slmconvert collect` in its own process; a sampler adds up the resident
memory of that process and every process under it (Ray's raylet and workers included; the Ray object
store's shared memory is counted in the workers that map it) and keeps the peak. Printed per run:
calls/s (calls stored / wall time, Ray's start included), peak RSS of the driver and of the whole
process tree, and bytes on disk (workspace vs log).

The demo agent repeats its sentences, so the scrubber's per-distinct-text caches make it faster here
than on real traffic (τ-bench: ~250 calls/s in one process; `benchmarks/scrub_speed.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CALLS_PER_SESSION = 320 / 120  # the demo generator's mix (seed 0)


def _generate(path: Path, calls: int) -> int:
    """Demo logs of about `calls` calls, written in parallel-friendly pieces of 20k sessions (one file)."""
    from slmconvert.demo import generate

    sessions = max(2, round(calls / CALLS_PER_SESSION))
    tmp = path.with_suffix(".part")
    n = 0
    with open(path, "w", encoding="utf-8") as out:
        for seed, start in enumerate(range(0, sessions, 20000)):
            generate(tmp, sessions=max(2, min(20000, sessions - start)), seed=1000 + seed)
            with open(tmp, encoding="utf-8") as f:
                for line in f:
                    rec = json.loads(line)
                    rec["session_id"] = f"g{seed}-{rec.get('session_id')}"  # sessions of different seeds stay apart
                    out.write(json.dumps(rec) + "\n")
                    n += 1
    tmp.unlink(missing_ok=True)
    return n


def _tree_rss(pid: int) -> tuple[int, int]:
    import psutil

    try:
        p = psutil.Process(pid)
        own = p.memory_info().rss
        total = own + sum(c.memory_info().rss for c in p.children(recursive=True) if c.is_running())
        return own, total
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0, 0


def _run(log: Path, ws: Path, engine: str, scrub: bool, cpus: int, sets: list[str]) -> dict:
    cmd = [sys.executable, "-m", "slmconvert", "collect", str(log), "--workspace", str(ws), "--json",
           "--set", f"engine={engine}", "--set", f"ray.num_cpus={cpus}"]
    for s in sets:
        cmd += ["--set", s]
    if not scrub:
        cmd += ["--set", "scrub.enabled=false"]
    peak = [0, 0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def sample():
        while proc.poll() is None:
            own, total = _tree_rss(proc.pid)
            peak[0], peak[1] = max(peak[0], own), max(peak[1], total)
            time.sleep(0.25)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    t.join()
    if proc.returncode != 0:
        raise SystemExit(f"{engine}: collect failed ({proc.returncode}): {err.strip()[-600:]}")
    summary = json.loads(out)
    disk = sum(f.stat().st_size for f in ws.rglob("*") if f.is_file())
    return {"calls": summary["invocations"], "wall_s": wall, "calls_per_s": summary["invocations"] / wall,
            "driver_peak_mb": peak[0] / 2**20, "tree_peak_mb": peak[1] / 2**20, "disk_mb": disk / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--engines", nargs="+", default=["local", "ray"], choices=["local", "ray"])
    ap.add_argument("--no-scrub", action="store_true", help="parse and write only")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs of the local Ray")
    ap.add_argument("--keep", type=Path, help="keep the logs and workspaces here")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="a pipeline setting for every run, e.g. collect.partition_mb=32")
    args = ap.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="slmconvert-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for size in args.sizes:
            log = root / f"calls-{size}.jsonl"
            if not log.exists():
                t = time.perf_counter()
                n = _generate(log, size)
                print(f"generated {n:,} calls ({log.stat().st_size / 2**20:,.0f} MB) in {time.perf_counter() - t:.0f} s", flush=True)
            log_mb = log.stat().st_size / 2**20
            for engine in args.engines:
                ws = root / f"ws-{size}-{engine}"
                shutil.rmtree(ws, ignore_errors=True)
                r = _run(log, ws, engine, not args.no_scrub, args.cpus, args.sets)
                r.update(size=size, engine=engine, log_mb=log_mb)
                rows.append(r)
                print(f"{size:>9,} {engine:<5} {r['calls']:>9,} calls  {r['calls_per_s']:>7,.0f} calls/s  {r['wall_s']:>7.1f} s  "
                      f"driver {r['driver_peak_mb']:>6,.0f} MB  tree {r['tree_peak_mb']:>6,.0f} MB  "
                      f"disk {r['disk_mb']:>6,.1f} MB (log {log_mb:,.1f} MB)", flush=True)
                if not args.keep:
                    shutil.rmtree(ws, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print("\n| calls | engine | calls/s | wall s | peak RSS driver MB | peak RSS all processes MB | disk MB (log MB) |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['calls']:,} | {r['engine']} | {r['calls_per_s']:,.0f} | {r['wall_s']:,.0f} | {r['driver_peak_mb']:,.0f} | "
              f"{r['tree_peak_mb']:,.0f} | {r['disk_mb']:,.1f} ({r['log_mb']:,.1f}) |")
    print(f"\n{'scrubbing on' if not args.no_scrub else 'scrubbing off'}; {os.cpu_count()} CPU(s) here, Ray given {args.cpus}")


if __name__ == "__main__":
    main()
