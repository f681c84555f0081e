"""SIGKILL during scrubbing: NER workers die with their parent and the workspace lock is free again."""

import os
import signal
import subprocess
import sys
import time

import pytest

from slmconvert.workspace import Workspace

CHILD = """
import os, sys, time
from types import SimpleNamespace
from slmconvert.progress import NULL_PROGRESS
from slmconvert.scrub.engine import Scrubber
from slmconvert.workspace import Workspace

pids = sys.argv[2]

class StuckNLP:  # stands in for spaCy: each worker reports its pid, then works 'forever'
    def pipe(self, texts, batch_size=64):
        open(os.path.join(pids, str(os.getpid())), "w").close()
        time.sleep(600)
        return iter(())

with Workspace(sys.argv[1]).lock():
    Scrubber._ner(SimpleNamespace(nlp=StuckNLP(), n_process=2, batch_size=64), ["Ann Lee"] * 1200, NULL_PROGRESS)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_sigkill_while_scrubbing_leaves_no_workers_and_no_lock(tmp_path):
    ws, pids = tmp_path / "ws", tmp_path / "pids"
    pids.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(ws), str(pids)])
    deadline = time.time() + 60
    while len(os.listdir(pids)) < 2 and time.time() < deadline:
        time.sleep(0.1)
    workers = [int(p) for p in os.listdir(pids)]
    assert len(workers) == 2, "the NER workers did not start"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers), "NER workers outlived their killed parent"
    with Workspace(ws).lock():  # a re-run is not told the workspace is in use by a dead pid
        pass
