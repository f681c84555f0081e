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
        named = {x["model"] for k in ("excluded", "unavailable", "not_probed", "ranked") for x in site[k]}
        assert len(named) == m.counts["catalogue"]  # nobody silently dropped
        reasons = {x["model"]: x["reason"] for k in ("excluded", "unavailable", "not_probed") for x in site[k]}
        assert "licence llama3.2 is not in select.licences" in reasons["llama-3.2-1b-instruct"]
        assert "> budget 4 GB" in reasons["qwen3-8b"]
        assert "not on this machine" in reasons["qwen3-0.6b"]
        # --no-probe ranks what is eligible and here by the catalogue, and says so: it never returns 0 candidates
        assert [c["model"] for c in site["ranked"]] == ["smollm2-135m-instruct"] == site["candidates"]
        assert site["ranked"][0]["score"] is None and "select.probe is false" in site["ranked_by"]
        assert "warning" not in site and site["p95_prompt_tokens"] > 0
    res = runner.invoke(app, ["select", "-w", str(demo_ws), "--no-probe"])
    assert res.exit_code == 0 and "ranked by catalogue" in res.output and "no model could be probed" not in res.output


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


def test_the_probe_keeps_to_its_time_budget_and_says_what_it_left(demo_ws, tmp_path):
    from slmconvert.select.stage import load_candidates, run

    folder = tiny_model_folder(tmp_path / "tiny")
    cat = tiny_catalogue(tmp_path / "cat.yaml", folder)
    cfg = stage_config(demo_ws, f"select.catalogue={cat}", "select.max_new_tokens=4", "select.probe_max_examples=6",
                       "select.probe_shots=0", "select.batch_size=2", "select.probe_time_budget_s=0.001")
    run(cfg, Workspace(demo_ws))
    for site in load_candidates(Workspace(demo_ws))["sites"].values():
        [c] = site["ranked"]  # still ranked: one batch per model and site always runs
        p = c["probe"]
        assert p["zero_shot"]["examples"] == 2 and p["not_probed"] == 4 and "time budget" in p["note"]


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


class _RefusingHub:
    """A 'hub' on loopback that accepts each connection and closes it at once, counting them."""

    def __init__(self):
        import socket
        import threading

        self.connections = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"

        def serve():
            while True:
                try:
                    conn, _ = self.sock.accept()
                except OSError:
                    return
                self.connections += 1
                conn.close()

        threading.Thread(target=serve, daemon=True).start()

    def close(self):
        self.sock.close()


def _catalogue_with_hub_models(path, folder):
    import yaml

    local = {"name": "tiny-llama", "family": "test", "params_b": 0.0001, "licence": "apache-2.0", "context_length": 8192,
             "tool_calling": False, "sources": {"folder": str(folder)}}
    hub = [{"name": f"hub-only-{i}", "family": "test", "params_b": 0.0002 + i * 1e-4, "licence": "apache-2.0",
            "context_length": 8192, "tool_calling": False, "sources": {"hub": f"nobody/hub-only-{i}"}} for i in range(3)]
    broken = tmp_broken = path.parent / "broken-model"
    tmp_broken.mkdir(exist_ok=True)
    (tmp_broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    bad = {"name": "broken-local", "family": "test", "params_b": 0.00005, "licence": "apache-2.0", "context_length": 8192,
           "tool_calling": False, "sources": {"folder": str(broken)}}
    path.write_text(yaml.safe_dump({"kind": "model-catalogue", "models": [local, bad, *hub]}))
    return path


@pytest.mark.parametrize("download", [False, True])
def test_select_without_hub_offline_variable_never_fails_on_an_unreachable_hub(demo_ws, tmp_path, monkeypatch, download):
    """The README's first run on a laptop without network: HF_HUB_OFFLINE unset, hub unreachable.
    Models that are not here are listed `unavailable` with the reason; a model whose weights fail
    to load is too; the run goes on with the rest and exits 0. The hub is asked at most once."""
    hub = _RefusingHub()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty Hugging Face cache
    from slmconvert.models import loading

    monkeypatch.setattr(loading, "_HUB_CHECKS", {})
    monkeypatch.setattr(loading, "_HUB_DOWN", {})
    folder = tiny_model_folder(tmp_path / "tiny")
    cat = _catalogue_with_hub_models(tmp_path / "cat.yaml", folder)
    try:
        r = runner.invoke(app, ["select", "-w", str(demo_ws), "--json", "--set", f"select.catalogue={cat}",
                                "--set", "select.max_new_tokens=4", "--set", "select.probe_max_examples=1",
                                "--set", "select.probe_shots=0", "--set", "select.probe_max_models=5",
                                "--set", f"select.download={str(download).lower()}"])
    finally:
        hub.close()
    assert r.exit_code == 0, r.output
    from slmconvert.select.stage import load_candidates

    for site in load_candidates(Workspace(demo_ws))["sites"].values():
        assert site["candidates"] == ["tiny-llama"]
        why = {x["model"]: x["reason"] for x in site["unavailable"]}
        assert why["broken-local"].startswith("unavailable: loading failed")
        for i in range(3):
            if download:
                assert "cannot be reached" in why[f"hub-only-{i}"], why
            else:
                assert "not on this machine" in why[f"hub-only-{i}"] and "select.download: true" in why[f"hub-only-{i}"]
    # Without select.download the hub is never asked; with it, once for the whole catalogue (no retries).
    assert hub.connections == (1 if download else 0)
