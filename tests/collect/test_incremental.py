"""Re-runs are no-ops, new data is added without re-reading old data, interrupted runs leave no trace."""

import pytest

from slmconvert.collect.stage import run
from slmconvert.store import load_invocations
from slmconvert.workspace import Workspace
from tests.conftest import rr_record, write_jsonl


def test_second_run_is_skipped_and_force_reruns(tmp_path, collect_config):
    log = write_jsonl(tmp_path / "a.jsonl", [rr_record(f"q{i}", answer="a", session=str(i)) for i in range(5)])
    cfg = collect_config(log)
    ws = Workspace(cfg.workspace)
    first = run(cfg, ws)
    files = {p.name: p.stat().st_mtime_ns for p in ws.stage_dir("collect").glob("*.parquet")}
    again = run(cfg, ws)
    assert first.status == "ran" and again.status == "skipped"
    assert ws.read_manifest("collect").status == "skipped"
    assert {p.name: p.stat().st_mtime_ns for p in ws.stage_dir("collect").glob("*.parquet")} == files
    forced = run(cfg, ws, force=True)
    assert forced.status == "ran" and forced.counts["invocations"] == 5


def test_a_second_file_adds_only_what_is_new(tmp_path, collect_config):
    a = write_jsonl(tmp_path / "a.jsonl", [rr_record(f"q{i}", answer="a", session=str(i)) for i in range(4)])
    b = write_jsonl(tmp_path / "b.jsonl", [rr_record(f"q{i}", answer="a", session=str(i)) for i in range(2, 7)])
    ws = Workspace(tmp_path / "ws")
    run(collect_config(a), ws)
    m = run(collect_config(a, b), ws)
    assert m.status == "updated"
    assert m.extra["last_run"]["files_read"] == 1  # a.jsonl was not read again
    assert m.extra["last_run"]["new_invocations"] == 3 and m.extra["last_run"]["duplicates"] == 2
    assert m.counts["invocations"] == 7 and len(load_invocations(ws)) == 7


def test_appended_jsonl_is_read_from_where_it_ended(tmp_path, collect_config):
    log = write_jsonl(tmp_path / "live.jsonl", [rr_record(f"q{i}", answer="a", session=str(i)) for i in range(3)])
    ws = Workspace(tmp_path / "ws")
    run(collect_config(log), ws)
    with open(log, "a") as f:
        f.write('{"broken\n')
    with open(log, "a") as f:
        import json
        f.write(json.dumps(rr_record("q9", answer="a", session="9")) + "\n")
    m = run(collect_config(log), ws)
    last = m.extra["last_run"]
    assert last["appended_files"] == 1 and last["new_invocations"] == 1 and last["duplicates"] == 0
    assert m.counts["invocations"] == 4
    q = (ws.stage_dir("collect") / "quarantine.jsonl").read_text()
    assert '"line 4"' in q  # line numbers continue across the append


def test_interrupted_write_leaves_previous_state_and_next_run_recovers(tmp_path, collect_config, monkeypatch):
    import slmconvert.collect.stage as stage

    a = write_jsonl(tmp_path / "a.jsonl", [rr_record("q1", answer="a", session="1")])
    b = write_jsonl(tmp_path / "b.jsonl", [rr_record("q2", answer="a", session="2")])
    ws = Workspace(tmp_path / "ws")
    run(collect_config(a), ws)
    before = ws.manifest_path("collect").read_text()

    real_write = stage.write_json_atomic

    def crash(path, obj):  # dies after the new shards are on disk, before tools.json and the manifest
        raise KeyboardInterrupt

    monkeypatch.setattr(stage, "write_json_atomic", crash)
    with pytest.raises(KeyboardInterrupt):
        run(collect_config(a, b), ws)
    monkeypatch.setattr(stage, "write_json_atomic", real_write)

    assert ws.manifest_path("collect").read_text() == before
    assert len(load_invocations(ws)) == 1  # readers see only what a manifest lists
    orphans = sorted(p.name for p in ws.stage_dir("collect").glob("*-00001.parquet"))
    assert orphans  # the interrupted run's shards exist but are not listed
    m = run(collect_config(a, b), ws)
    assert m.counts["invocations"] == 2
    assert sorted(p.name for p in ws.stage_dir("collect").glob("*.parquet")) == sorted(f for f in m.files if f.endswith(".parquet"))
    assert not list(ws.stage_dir("collect").glob(".*.tmp"))


def test_changed_config_rebuilds(tmp_path, collect_config):
    log = write_jsonl(tmp_path / "a.jsonl", [rr_record("q", answer="a")])
    ws = Workspace(tmp_path / "ws")
    run(collect_config(log), ws)
    m = run(collect_config(log, model="my-llm"), ws)
    assert m.status == "ran"
    (inv,) = load_invocations(ws)
    assert inv.model == "gpt-4o"  # the log's own model wins over the default
    assert m.counts["invocations"] == 1


def test_workspace_lock_refuses_a_concurrent_run(tmp_path, collect_config):
    from slmconvert.errors import StageError

    log = write_jsonl(tmp_path / "a.jsonl", [rr_record("q", answer="a")])
    ws = Workspace(tmp_path / "ws")
    with ws.lock():
        with pytest.raises(StageError, match="is in use by pid"):
            run(collect_config(log), ws)
