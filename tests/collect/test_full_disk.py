"""A full disk while writing Parquet: a clear message and exit 28, no temp file left, never an abort."""

import json
import os
import subprocess
import sys

from tests.conftest import rr_record, write_jsonl

CHILD = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, like a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
sys.argv = ["slmconvert", "collect", sys.argv[2], "-w", sys.argv[3], "--no-scrub"]
from slmconvert.cli import main
main()
"""


def test_parquet_write_on_a_full_disk_is_a_clear_error(tmp_path):
    import random

    rnd = random.Random(0)
    noise = lambda n: "".join(rnd.choices("abcdefghijklmnopqrstuvwxyz0123456789 ", k=n))  # noqa: E731 - incompressible
    log = write_jsonl(tmp_path / "log.jsonl", [rr_record(noise(4000), answer=noise(2000), session=f"s{i}") for i in range(60)])
    ws = tmp_path / "ws"
    # 64 KiB per file: the JSON files fit, the Parquet shards (~400 KB) do not.
    r = subprocess.run([sys.executable, "-c", CHILD, str(64 * 1024), str(log), str(ws)], capture_output=True, text=True,
                       env={**os.environ, "COLUMNS": "200"}, timeout=300)
    assert r.returncode == 28, (r.returncode, r.stderr[-2000:])
    assert "file size limit reached while writing" in r.stderr and "Traceback" not in r.stderr
    left = sorted(p.name for p in (ws / "invocations").iterdir()) if (ws / "invocations").exists() else []
    assert not [n for n in left if n.endswith(".tmp")], left
    assert "manifest.json" not in left  # nothing claims to be stored
    # With room again, the same command stores everything.
    r = subprocess.run([sys.executable, "-m", "slmconvert", "collect", str(log), "-w", str(ws), "--no-scrub", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["invocations"] == 60
