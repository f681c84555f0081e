"""`slmconvert select`: constraints with reasons, the probe, and the candidates file."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from slmconvert.cli import app
from slmconvert.workspace import Workspace
from tests.conftest import needs_tau, stage_config, tiny_catalogue, tiny_model_folder

runner = CliRunner()


@pytest.fixture
def demo_ws(clustered_demo, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(clustered_demo[0], ws)
    return ws


def test_every_model_left_out_has_a_reason(demo_ws, monkeypatch):
    from slmconvert.select.stage import load_candidates, run

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    m = run(stage_config(demo_ws, "select.probe=false", "select.memory_budget_gb=4", 'select.licences=["apache-2.0","mit"]'),
            Workspace(demo_ws))
    doc = load_candidates(Workspace(demo_ws))
    assert m.counts["sites"] == 3 == len(doc["sites"])
    for site in doc["sites"].values():
        named = {x["model"] for k in ("excluded", "unavailable", "not_probed") for x in site[k]}
        assert len(named) == m.counts["catalogue"]  # nobody silently dropped
        reasons = {x["model"]: x["reason"] for k in ("excluded", "unavailable", "not_probed") for x in site[k]}
        assert "licence llama3.2 is not in select.licences" in reasons["llama-3.2-1b-instruct"]
        assert "> budget 4 GB" in reasons["qwen3-8b"]
        assert "not available offline" in reasons["qwen3-0.6b"]
        assert reasons["smollm2-135m-instruct"] == "select.probe is false"
        assert site["p95_prompt_tokens"] > 0 and site["ranked"] == []


def test_probe_ranks_a_local_model_with_scores(demo_ws, tmp_path):
    from slmconvert.select.stage import load_candidates, run

    folder = tiny_model_folder(tmp_path / "tiny")
    cat = tiny_catalogue(tmp_path / "cat.yaml", folder)
    cfg = stage_config(demo_ws, f"select.catalogue={cat}", "select.max_new_tokens=8", "select.probe_max_examples=3",
                       "select.probe_shots=1", "select.max_prompt_tokens=512")
    m = run(cfg, Workspace(demo_ws))
    doc = load_candidates(Workspace(demo_ws))
    for site in doc["sites"].values():
        [c] = site["ranked"]
        assert c["model"] == "tiny-llama" and c["rank"] == 1 and site["candidates"] == ["tiny-llama"]
        p = c["probe"]
        assert p["examples"] == 3 and p["tool_format"] == "fallback"
        assert 0 <= p["zero_shot"]["score"] <= 1 and "few_shot" in p and "call_agreement" in p["zero_shot"]["metrics"]
        assert p["source"] == "folder"
    assert run(cfg, Workspace(demo_ws)).status == "skipped"
    assert m.extra["candidates"] == {s: ["tiny-llama"] for s in doc["sites"]}


def test_select_before_cluster_and_unknown_local_model(tmp_path):
    r = runner.invoke(app, ["select", "-w", str(tmp_path / "nothing")])
    assert r.exit_code == 4 and "slmconvert cluster" in r.stderr
    r = runner.invoke(app, ["select", "-w", str(tmp_path / "nothing"), "--set", "select.local_models.gpt-9=/x"])
    assert r.exit_code == 2 and "Unknown model: 'gpt-9'" in r.stderr


@needs_tau
@pytest.mark.slow
def test_taubench_ranks_packaged_smollm2_and_explains_the_rest(clustered_tau, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SLMCONVERT_CACHE", str(tmp_path / "cache"))
    ws = tmp_path / "ws"
    shutil.copytree(clustered_tau[0], ws)
    sets = [x for kv in ("scrub.enabled=false", "select.probe_max_examples=2", "select.max_new_tokens=24",
                         "select.max_prompt_tokens=1024", "select.probe_shots=1") for x in ("--set", kv)]
    r = runner.invoke(app, ["select", "-w", str(ws), "--json", *sets])
    assert r.exit_code == 0, r.output
    [(site_name, cands)] = json.loads(r.stdout)["candidates"].items()
    assert cands == ["smollm2-135m-instruct"]
    from slmconvert.select.stage import load_candidates

    site = load_candidates(Workspace(ws))["sites"][site_name]
    [c] = site["ranked"]
    assert c["probe"]["source"] == "pypi" and c["probe"]["examples"] == 2
    assert set(c["probe"]["zero_shot"]["metrics"]) >= {"call_agreement"}
    others = {x["model"] for k in ("excluded", "unavailable", "not_probed") for x in site[k]}
    assert len(others) == 24 and "smollm2-135m-instruct" not in others
    table = runner.invoke(app, ["select", "-w", str(ws), *sets], env={"COLUMNS": "200"})
    assert "select: skipped" in table.stdout  # same inputs, same config, same models available
    assert "smollm2-135m-instruct" in table.stdout and "not available" in table.stdout and "excluded" in table.stdout
