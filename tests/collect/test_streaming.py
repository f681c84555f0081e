"""Large inputs: a JSON array is streamed element by element, and invocations go to the workspace
in session partitions, so memory holds one partition, never the file. Partitioning must not change
what is stored."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

import slmconvert.collect.stage as stage
from slmconvert.collect.stage import CollectStrictError, run
from slmconvert.demo import generate
from slmconvert.io import read_json, read_jsonl
from slmconvert.store import load_invocations
from slmconvert.workspace import Workspace
from tests.conftest import rr_record


def _collect(collect_config, ws, *paths, **kw):
    cfg = collect_config(*paths, ws=ws, **kw)
    workspace = Workspace(cfg.workspace)
    m = run(cfg, workspace)
    return m, workspace


def _stored(workspace):
    return sorted((i.id, i.session_id, json.dumps(i.request.messages), i.request.tools_source) for i in load_invocations(workspace))


def test_partitions_store_what_one_pass_stores(tmp_path, collect_config, monkeypatch):
    log = tmp_path / "demo.jsonl"
    generate(log, sessions=20, seed=5, fmt="shapes")  # tools inferred for the tool-less text-action agent
    one, ws_one = _collect(collect_config, tmp_path / "one", log)
    monkeypatch.setattr(stage, "FLUSH_EVERY", 7)
    many, ws_many = _collect(collect_config, tmp_path / "many", log, partition_mb=log.stat().st_size / 2**20 / 5)
    assert _stored(ws_many) == _stored(ws_one)
    assert {k: v for k, v in many.counts.items() if k != "files"} == {k: v for k, v in one.counts.items() if k != "files"}
    assert read_json(ws_many.stage_dir("collect") / "tools.json") == read_json(ws_one.stage_dir("collect") / "tools.json")
    shards = [f for f in many.files if f.startswith("invocations-")]
    assert len(shards) >= 4  # written a partition at a time (5 partitions; one may hold no session)
    for shard in shards:  # a session lies whole in one partition, so in one shard
        sessions = set(pq.read_table(ws_many.stage_dir("collect") / shard, columns=["session_id"]).column(0).to_pylist())
        others = [pq.read_table(ws_many.stage_dir("collect") / s, columns=["session_id"]).column(0).to_pylist()
                  for s in shards if s != shard]
        assert not sessions & {x for o in others for x in o}
    # an unchanged re-run is still a no-op
    again, _ = _collect(collect_config, tmp_path / "many", log, partition_mb=log.stat().st_size / 2**20 / 5)
    assert again.skipped


def test_strict_run_in_partitions_leaves_nothing_behind(tmp_path, collect_config, monkeypatch):
    monkeypatch.setattr(stage, "FLUSH_EVERY", 2)
    lines = [json.dumps(rr_record(f"q{i}", answer="a", session=f"s{i}")) for i in range(6)] + ["{not json"]
    log = tmp_path / "calls.jsonl"
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(CollectStrictError, match="1 bad record"):
        _collect(collect_config, tmp_path / "ws", log, strict=True, partition_mb=0.0005)
    assert not list((tmp_path / "ws" / "invocations").glob("*.parquet"))


def test_a_json_array_keeps_every_element_beside_a_bad_one(tmp_path, collect_config):
    good = [json.dumps(rr_record(f"q{i}", answer="a", session=f"s{i}")).encode() for i in range(4)]
    bad = json.dumps(rr_record("caf\u00e9", answer="a", session="x")).encode().replace(b"caf\\u00e9", b"caf\xe9")  # latin-1 byte
    deep = b"[" * 3000 + b"]" * 3000
    path = tmp_path / "calls.json"
    path.write_bytes(b"[" + b",\n".join([good[0], bad, good[1], deep, good[2], good[3]]) + b"]")
    m, ws = _collect(collect_config, tmp_path / "ws", path)
    q = {e["locator"]: e["code"] for e in read_jsonl(ws.stage_dir("collect") / "quarantine.jsonl")}
    assert q == {"index 1": "invalid_utf8", "index 3": "too_deep"}
    assert m.counts["invocations"] == 4  # the elements after both bad ones are read too
    assert "caf" not in (ws.stage_dir("collect") / "quarantine.jsonl").read_text()


def test_an_array_on_one_line_and_a_malformed_one(tmp_path, collect_config):
    elems = [rr_record(f"q{i}", answer="a", session=f"s{i}") for i in range(3)]
    one_line = tmp_path / "one.json"
    one_line.write_text(json.dumps(elems))  # no newline anywhere: never read as one line
    m, _ = _collect(collect_config, tmp_path / "ws", one_line)
    assert m.counts["invocations"] == 3 and m.extra["formats"] == {"request-response": 1}
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(elems)[:-1].replace('}, {"session_id": "s2"', '} {"session_id": "s2"'))
    m, ws = _collect(collect_config, tmp_path / "ws2", broken)
    (entry,) = read_jsonl(ws.stage_dir("collect") / "quarantine.jsonl")
    assert m.counts["invocations"] == 2 and entry["locator"] == "index 2" and entry["code"] == "malformed_json"
