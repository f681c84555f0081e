"""`slmconvert run`: the whole conversion in one command, skipping what is unchanged, resuming what was killed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_model_folder


def slmconvert(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "slmconvert", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=1800)


def manifests(ws: Path) -> dict[str, dict]:
    out = {}
    for stage, folder in {"collect": "invocations", "cluster": "clusters", "select": "candidates", "finetune": "models",
                          "evaluate": "eval"}.items():
        p = ws / folder / "manifest.json"
        if p.exists():
            out[stage] = json.loads(p.read_text())
    return out


@pytest.mark.slow
def test_trimmed_quickstart_end_to_end_then_nothing_changed(tmp_path):
    """pipelines/quickstart.yaml on a tiny subset with few steps, with the packaged SmolLM2, through every stage."""
    ws, data = tmp_path / "ws", tmp_path / "data" / "logs.jsonl"
    trim = ["workspace=" + str(ws), "demo_data.output=" + str(data), f"collect.paths=[{data}]", "demo_data.sessions=16",
            "select.probe_max_examples=2", "select.probe_shots=0", "select.max_new_tokens=16",
            "finetune.max_steps=2", "finetune.batch_size=2", "finetune.max_train_examples=4", "finetune.max_length=512",
            "evaluate.max_test_examples=3", "evaluate.max_new_tokens=24", "evaluate.batch_size=4"]
    sets = [a for s in trim for a in ("--set", s)]
    r = slmconvert("run", str(REPO / "pipelines" / "quickstart.yaml"), *sets, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert [s["stage"] for s in out["stages"]] == ["demo-data", "collect", "scrub", "cluster", "select", "finetune", "evaluate"]
    m = manifests(ws)
    assert set(m) == {"collect", "cluster", "select", "finetune", "evaluate"}
    assert m["collect"]["counts"]["invocations"] > 0 and m["collect"]["extra"]["scrub"]["enabled"]
    assert m["cluster"]["counts"]["sites"] == 3 and m["cluster"]["counts"]["test"] > 0
    assert all(c == ["smollm2-135m-instruct"] for c in m["select"]["extra"]["candidates"].values())
    assert m["finetune"]["counts"]["trained"] == 3
    assert m["evaluate"]["counts"]["adapters"] == 3 and m["evaluate"]["counts"]["rows"] > 0
    h = out["headline"]
    assert h == m["evaluate"]["extra"]["headline"] and sum(h["verdicts"].values()) == m["cluster"]["counts"]["tasks"]
    assert Path(out["report"]).exists()
    summary = json.loads((ws / "eval" / "summary.json").read_text())
    assert summary["overall"]["base_tool"]["n"] > 0 and summary["overall"]["finetuned_tool"]["n"] > 0
    first = json.loads((ws / "iterations.jsonl").read_text().splitlines()[0])
    assert first["iteration"] == 1 and "finetune" in first["ran"] and first["after"]["headline"]["share_calls"] == h["share_calls"]

    t = time.perf_counter()
    again = slmconvert("run", str(REPO / "pipelines" / "quickstart.yaml"), *sets, "--json")
    took = time.perf_counter() - t
    assert again.returncode == 0, again.stderr[-2000:]
    statuses = {s["stage"]: s["status"] for s in json.loads(again.stdout)["stages"]}
    assert statuses == {"demo-data": "skipped", "collect": "skipped", "scrub": "inside collect", "cluster": "skipped",
                        "select": "skipped", "finetune": "skipped", "evaluate": "skipped"}
    second = json.loads((ws / "iterations.jsonl").read_text().splitlines()[1])
    assert second["iteration"] == 2 and second["ran"] == [] and second["new_invocations"] == 0
    print(f"unchanged re-run: {took:.1f} s")


@pytest.mark.slow
def test_agents_logged_in_other_shapes_go_from_collect_to_a_verdict(tmp_path):
    """The demo agents logged as other agents log: policy once per file, nested histories, a user's own tool
    calls, a triage agent acting in plain text, per-user client ids. No collect option is set."""
    ws, data = tmp_path / "ws", tmp_path / "data" / "shapes.jsonl"
    trim = ["workspace=" + str(ws), "demo_data.output=" + str(data), f"collect.paths=[{data}]", "demo_data.sessions=20",
            "demo_data.format=shapes", "select.probe_max_examples=2", "select.probe_shots=0", "select.max_new_tokens=16",
            "finetune.max_steps=2", "finetune.batch_size=2", "finetune.max_train_examples=4", "finetune.max_length=512",
            "evaluate.max_test_examples=3", "evaluate.max_new_tokens=24", "evaluate.batch_size=4"]
    r = slmconvert("run", str(REPO / "pipelines" / "quickstart.yaml"), *[a for s in trim for a in ("--set", s)], "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    m = manifests(ws)
    c = m["collect"]["counts"]
    assert c["quarantined"] == 0 and c["sessions"] == 20 and c["kept_user_side_tool_calls"] > 0
    assert m["collect"]["extra"]["text_actions"]["call"]["FINISH"] > 0
    assert "FINISH" in m["collect"]["extra"]["tools"] and "share_calendar" not in m["collect"]["extra"]["tools"]
    assert m["cluster"]["counts"]["sites"] == 3  # one per agent: client ids split nothing
    h = json.loads(r.stdout)["headline"]
    assert sum(h["verdicts"].values()) == m["cluster"]["counts"]["tasks"] > 0


def test_kill_during_finetune_then_run_again_resumes(tmp_path):
    """SIGKILL `slmconvert run` while it fine-tunes; the next run resumes from the checkpoint and redoes nothing."""
    folder = tiny_model_folder(tmp_path / "tiny")
    data = tmp_path / "logs.jsonl"
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"""
workspace: {tmp_path / 'ws'}
demo_data: {{output: {data}, sessions: 24, seed: 1}}
collect: {{paths: [{data}]}}
scrub: {{enabled: false}}
select: {{models: [smollm2-135m-instruct], probe: false}}
finetune: {{models: [{folder}], max_steps: 60, batch_size: 2, max_length: 256, checkpoint_steps: 2, max_train_examples: 8}}
evaluate: {{max_test_examples: 2, max_new_tokens: 4, max_prompt_tokens: 256}}
""")
    ws = tmp_path / "ws"
    proc = subprocess.Popen([sys.executable, "-m", "slmconvert", "run", str(pipeline)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    ckpt = None
    while time.time() < deadline and proc.poll() is None:
        found = sorted((ws / "models").glob("*/*/checkpoints/checkpoint-*"))
        if found:
            ckpt = found[0]
            time.sleep(0.3)  # let the checkpoint finish writing, then kill mid-training
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert ckpt is not None, "the run finished or failed before a checkpoint appeared"
    assert not (ws / "models" / "manifest.json").exists()
    before = {p: p.stat().st_mtime_ns for p in (ws / "clusters").iterdir() if p.is_file() and p.name != "manifest.json"}
    r = slmconvert("run", str(pipeline), "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    stages = {s["stage"]: s["status"] for s in json.loads(r.stdout)["stages"]}
    assert stages["collect"] == stages["cluster"] == stages["select"] == "skipped"  # nothing already done is redone
    assert {p: p.stat().st_mtime_ns for p in before} == before
    fm = json.loads((ws / "models" / "manifest.json").read_text())
    resumed = [a for a in fm["extra"]["adapters"] if a["resumed_from"]]
    assert resumed and resumed[0]["resumed_from"].startswith("checkpoint-")
    records = [json.loads(line) for line in (ws / "iterations.jsonl").read_text().splitlines()]
    assert records[-1]["ran"][-2:] == ["finetune", "evaluate"]
