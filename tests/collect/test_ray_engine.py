"""`engine: ray` writes the workspace `engine: local` writes: collect (parse in pieces, scrub in session
partitions on an actor pool) and cluster (embedding on workers), on a local Ray with 2 CPUs."""

from __future__ import annotations

import builtins
import json
import shutil

import pyarrow.parquet as pq
import pytest

from slmconvert.config import load_config
from slmconvert.demo import generate
from slmconvert.errors import StageError
from slmconvert.io import read_json, read_jsonl
from slmconvert.store import load_invocations
from slmconvert.workspace import Workspace
from tests.conftest import REPO

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[ray]'")

SMALL = ["collect.partition_mb=0.25", "ray.chunk_mb=0.2", "ray.embed_chunk=64", "ray.num_cpus=2"]


@pytest.fixture(scope="module")
def local_ray():
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _log(tmp_path):
    """The quickstart's demo agent, with bad lines where the pieces are cut and a blank line."""
    log = tmp_path / "agent_logs.jsonl"
    generate(log, sessions=120, seed=0, fmt="request-response")
    lines = log.read_text().splitlines()
    for i in (2, 57, 58, 139, 200):
        lines[i] = lines[i][: len(lines[i]) // 2]  # cut: malformed JSON
    lines.insert(100, "")
    log.write_text("\n".join(lines) + "\n")
    return log


def _run(engine, ws, log, *sets):
    from slmconvert.cluster.stage import run as cluster
    from slmconvert.collect.stage import run as collect

    cfg = load_config(str(REPO / "pipelines" / "quickstart.yaml"), [f"workspace={json.dumps(str(ws))}", f"engine={engine}",
                                                     f"collect.paths={json.dumps([str(log)])}", *SMALL, *sets])
    workspace = Workspace(cfg.workspace)
    return collect(cfg, workspace), cluster(cfg, workspace), workspace


def _files(ws, stage):
    return {p.name: p.read_bytes() for p in sorted(ws.stage_dir(stage).glob("*.parquet"))}


def test_ray_writes_the_workspace_local_writes(tmp_path, local_ray):
    log = _log(tmp_path)
    ws_local, ws_ray = tmp_path / "local", tmp_path / "ray"
    ws_ray.mkdir()
    c_local, k_local, local = _run("local", ws_local, log)
    shutil.copy(ws_local / ".scrub_key", ws_ray / ".scrub_key")  # one surrogate secret, as one workspace re-collected has
    c_ray, k_ray, rayws = _run("ray", ws_ray, log)

    # collect + scrub: same counts, same shards byte for byte (ids, scrubbed texts, messages), same quarantine
    assert c_ray.counts == c_local.counts
    assert c_local.counts["invocations"] > 250 and c_local.counts["dropped_malformed_json"] == 5
    assert c_ray.files == c_local.files and len([f for f in c_local.files if f.startswith("invocations-")]) >= 3
    assert _files(rayws, "collect") == _files(local, "collect")
    q = lambda ws: [(e["file"], e["locator"], e["code"]) for e in read_jsonl(ws.stage_dir("collect") / "quarantine.jsonl")]
    assert q(rayws) == q(local) and [x[1] for x in q(local)] == ["line 3", "line 58", "line 59", "line 141", "line 202"]
    for name in ("tools.json",):
        assert read_json(rayws.stage_dir("collect") / name) == read_json(local.stage_dir("collect") / name)
    report = lambda ws: {k: v for k, v in read_json(ws.stage_dir("collect") / "scrub_report.json").items() if k != "seconds"}
    assert report(rayws) == report(local) and report(local)["entities"]["PERSON"]["values"] > 0
    assert c_ray.inputs == c_local.inputs  # the file records an incremental run resumes from (size, lines, hash)
    # a session lies whole in one shard (its partition): the scrubber saw all of it
    seen: dict[str, str] = {}
    for shard in [f for f in c_ray.files if f.startswith("invocations-")]:
        for s in pq.read_table(rayws.stage_dir("collect") / shard, columns=["session_id"]).column(0).to_pylist():
            assert seen.setdefault(s, shard) == shard
    assert [c.to_dict() for c in load_invocations(rayws)] == [c.to_dict() for c in load_invocations(local)]

    # cluster: embeddings on Ray workers, same sites, tasks, split and assignments
    assert {k: v for k, v in k_ray.counts.items()} == k_local.counts
    a_local = pq.read_table(local.stage_dir("cluster") / "assignments.parquet").to_pydict()
    a_ray = pq.read_table(rayws.stage_dir("cluster") / "assignments.parquet").to_pydict()
    for col in ("invocation_id", "session", "site", "task", "split"):
        assert a_ray[col] == a_local[col]
    assert read_json(rayws.stage_dir("cluster") / "tasks.json") == read_json(local.stage_dir("cluster") / "tasks.json")

    # an unchanged re-run on Ray is a no-op, like on local
    again, _, _ = _run("ray", ws_ray, log)
    assert again.status == "skipped"
    # a new log file: both engines add the same shards after the ones they have (messages already stored
    # are not written again), and the same calls and tools
    more = tmp_path / "more.jsonl"
    generate(more, sessions=30, seed=7, fmt="request-response")
    grown = {}
    for engine, ws in (("local", ws_local), ("ray", ws_ray)):
        from slmconvert.collect.stage import run as collect

        cfg = load_config(str(REPO / "pipelines" / "quickstart.yaml"), [f"workspace={json.dumps(str(ws))}", f"engine={engine}",
                                                                         f"collect.paths={json.dumps([str(log), str(more)])}", *SMALL])
        grown[engine] = collect(cfg, Workspace(ws))
    assert grown["ray"].counts == grown["local"].counts and grown["ray"].files == grown["local"].files
    assert grown["local"].extra["last_run"]["new_invocations"] > 50 and grown["local"].status == "updated"
    assert _files(rayws, "collect") == _files(local, "collect")
    assert read_json(rayws.stage_dir("collect") / "tools.json") == read_json(local.stage_dir("collect") / "tools.json")


def test_engine_ray_without_ray_says_how_to_install(tmp_path, monkeypatch, collect_config):
    from slmconvert.collect.stage import run

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    log = tmp_path / "a.jsonl"
    generate(log, sessions=4, seed=1)
    cfg = collect_config(log)
    cfg.engine = "ray"
    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(StageError, match=r"pip install 'slmconvert\[ray\]'"):
        run(cfg, Workspace(cfg.workspace))
    monkeypatch.undo()
    assert not list((tmp_path / "ws").rglob("*.parquet"))  # nothing half-written
