"""The bad-input battery: each case through the real CLI, as a user would meet it. Prints one table row
per case: what was fed, the exit code, the first line of the message, and the good records kept.

    python benchmarks/bad_input.py

Every case has a test under tests/ (named in the last column); this script shows them side by side.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def record(i: int, session: str | None = None) -> dict:
    return {"session_id": session or f"s{i}",
            "request": {"model": "gpt-4o", "messages": [{"role": "system", "content": "You are a helpful agent."},
                                                       {"role": "user", "content": f"question {i}"}]},
            "response": {"choices": [{"message": {"role": "assistant", "content": f"answer {i}"}, "finish_reason": "stop"}]}}


def lines(n: int, start: int = 0) -> str:
    return "".join(json.dumps(record(start + i)) + "\n" for i in range(n))


def cli(*args: str, env: dict | None = None, pre: str = "") -> subprocess.CompletedProcess:
    code = pre + "import sys; from slmconvert.cli import main; sys.argv = ['slmconvert'] + sys.argv[1:]; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "COLUMNS": "300", **(env or {})}, timeout=600)


def kept(ws: Path) -> str:
    m = ws / "invocations" / "manifest.json"
    if not m.exists():
        return "0 (nothing stored)"
    manifest = json.loads(m.read_text())
    if not isinstance(manifest, dict):
        return "the damaged manifest, untouched"
    counts = manifest["counts"]
    return f"{counts.get('invocations', 0)} kept, {counts.get('quarantined', 0)} quarantined"


def message(r: subprocess.CompletedProcess) -> str:
    err = [x for x in r.stderr.splitlines() if x.strip() and not x.startswith("Warning: scrubbing is OFF")]
    if "Traceback" in r.stderr:
        return "TRACEBACK: " + (err[-1] if err else "")
    return (err[0] if err else "(none)")[:150].replace("|", "/")


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="slmconvert-bad-input-"))
    rows = []

    def case(kind: str, test: str, build, *extra: str, env=None, pre: str = "") -> None:
        d = root / f"case{len(rows)}"
        d.mkdir()
        (d / "good.jsonl").write_text(lines(5, 1000))
        ws = d / "ws"
        args = build(d, ws)
        r = cli(*args, env=env, pre=pre) if args else None
        rows.append((kind, r.returncode if r else "-", message(r) if r else "", kept(ws), test))

    def collect(*paths):
        return lambda d, ws: ["collect", *(str(d / p) for p in paths), "-w", str(ws), "--no-scrub", *([] if paths else [])]

    def deep(d, ws):
        (d / "deep.jsonl").write_text(lines(2) + '{"request": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
        return collect("deep.jsonl", "good.jsonl")(d, ws)

    def gz(d, ws):
        packed = gzip.compress(lines(200).encode())
        (d / "cut.jsonl.gz").write_bytes(packed[: len(packed) // 2])
        (d / "bad.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00garbage" * 20)
        (d / "plain.jsonl.gz").write_text(lines(1, 500))
        return collect("cut.jsonl.gz", "bad.jsonl.gz", "plain.jsonl.gz", "good.jsonl")(d, ws)

    def utf16(d, ws):
        (d / "u16.jsonl").write_bytes(lines(4, 700).encode("utf-16"))
        return collect("u16.jsonl", "good.jsonl")(d, ws)

    def full_disk(d, ws):
        rnd = random.Random(0)
        noise = lambda n: "".join(rnd.choices("abcdefghijklmnopqrstuvwxyz ", k=n))  # noqa: E731
        recs = [{**record(i), "request": {"messages": [{"role": "user", "content": noise(4000)}]}} for i in range(60)]
        (d / "big.jsonl").write_text("".join(json.dumps(x) + "\n" for x in recs))
        return collect("big.jsonl")(d, ws)

    def ws_file(d, ws):
        ws.write_text("not a folder")
        return collect("good.jsonl")(d, ws)

    def manifest_list(d, ws):
        cli(*collect("good.jsonl")(d, ws))
        (ws / "invocations" / "manifest.json").write_text("[]")
        return collect("good.jsonl")(d, ws)

    def manifest_list_force(d, ws):
        return manifest_list(d, ws) + ["--force"]

    def shard(d, ws):
        cli(*collect("good.jsonl")(d, ws))
        p = next((ws / "invocations").glob("invocations-*.parquet"))
        p.write_bytes(p.read_bytes()[:100])
        return ["cluster", "-w", str(ws)]

    def validate(d, ws):
        f = d / "p.yaml"
        f.write_text(f"workspace: {ws}\ncollect:\n  paths: [{d}/missing.jsonl]\n  tools_file: {d}/tools.json\nscrub:\n  policy: nosuch\n"
                     f"select:\n  catalogue: {d}/models.yaml\nfinetune:\n  models: [gpt-9]\nevaluate:\n  prices: {d}/prices.yaml\n")
        return ["validate", str(f)]

    case("deeply nested JSON line (depth 100k)", "tests/collect/test_bad_files.py", deep)
    case("truncated / corrupt / mis-named .gz", "tests/collect/test_bad_files.py", gz)
    case("UTF-16 with BOM", "tests/collect/test_bad_files.py", utf16)
    case("full disk while writing Parquet (RLIMIT_FSIZE)", "tests/collect/test_full_disk.py", full_disk,
         pre="import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
             "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536)); ")
    case("workspace path is a file", "tests/core/test_damaged_workspace.py", ws_file)
    case("manifest is []", "tests/core/test_damaged_workspace.py", manifest_list)
    case("... the advice: same with --force", "tests/core/test_damaged_workspace.py", manifest_list_force)
    case("truncated Parquet shard (cluster reads it)", "tests/core/test_damaged_workspace.py", shard)
    case("pipeline naming missing files / models", "tests/core/test_config.py", validate)
    print("| input | exit | message (first line) | good records | test |")
    print("| --- | --- | --- | --- | --- |")
    for kind, code, msg, k, test in rows:
        print(f"| {kind} | {code} | {msg} | {k} | `{test}` |")


if __name__ == "__main__":
    main()
