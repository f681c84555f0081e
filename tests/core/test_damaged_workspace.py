"""A damaged workspace gives a clear error whose advice works: a file as workspace, a manifest that
is not one, a truncated Parquet shard."""

import json

from typer.testing import CliRunner

from slmconvert.cli import app
from tests.conftest import rr_record, write_jsonl

runner = CliRunner()


def _collect(log, ws, *extra):
    return runner.invoke(app, ["collect", str(log), "-w", str(ws), "--no-scrub", "--json", *extra])


def test_workspace_that_is_a_file(tmp_path):
    log = write_jsonl(tmp_path / "log.jsonl", [rr_record("hi", answer="ok")])
    (tmp_path / "ws").write_text("not a folder")
    r = _collect(log, tmp_path / "ws")
    assert r.exit_code == 4 and "is a file, not a folder" in r.stderr and r.exception.__class__ is SystemExit


def test_damaged_manifest_and_shard_are_named_and_force_rebuilds(tmp_path):
    log = write_jsonl(tmp_path / "log.jsonl", [rr_record(f"hi {i}", answer="ok", session=f"s{i}") for i in range(5)])
    ws = tmp_path / "ws"
    assert _collect(log, ws).exit_code == 0
    (ws / "invocations" / "manifest.json").write_text("[]")
    r = _collect(log, ws)
    assert r.exit_code == 4 and "manifest is damaged" in r.stderr and "--force" in r.stderr
    r = _collect(log, ws, "--force")  # the advice works
    assert r.exit_code == 0 and json.loads(r.stdout)["invocations"] == 5
    shard = next((ws / "invocations").glob("invocations-*.parquet"))
    shard.write_bytes(shard.read_bytes()[:200])  # truncated
    r = runner.invoke(app, ["cluster", "-w", str(ws)])
    assert r.exit_code == 4 and f"{shard} is damaged" in r.stderr and "slmconvert collect" in r.stderr and "--force" in r.stderr
    r = _collect(log, ws, "--force")
    assert r.exit_code == 0 and json.loads(r.stdout)["invocations"] == 5
