"""The CLI as a user meets it: help, JSON output, clear errors."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from slmconvert.cli import app
from tests.conftest import rr_record, write_jsonl

runner = CliRunner()
COMMANDS = [c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands]


@pytest.mark.parametrize("command", [[]] + [[c] for c in COMMANDS], ids=lambda c: " ".join(c) or "root")
def test_help_for_every_command(command):
    r = runner.invoke(app, command + ["--help"])
    assert r.exit_code == 0, r.output
    assert "Usage" in r.output


def test_help_does_not_import_heavy_libraries():
    code = ("import sys; from slmconvert.cli import app; "
            "heavy = [m for m in ('datasets', 'torch', 'transformers', 'presidio_analyzer', 'spacy', 'pyarrow', 'pydantic') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_collect_json_output(tmp_path):
    log = write_jsonl(tmp_path / "a.jsonl", [rr_record("q", call=("f", {"x": 1}), session="1"), rr_record("q2", answer="a", session="2")])
    r = runner.invoke(app, ["collect", str(log), "-w", str(tmp_path / "ws"), "--no-scrub", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert {k: out[k] for k in ("invocations", "tool_calls", "text", "sessions", "tools", "quarantined", "duplicates")} == \
        {"invocations": 2, "tool_calls": 1, "text": 1, "sessions": 2, "tools": ["f"], "quarantined": 0, "duplicates": 0}
    assert out["workspace"] == str(tmp_path / "ws")
    assert "scrubbing is OFF" in r.stderr


def test_collect_errors_are_one_clear_line(tmp_path):
    r = runner.invoke(app, ["collect", str(tmp_path / "missing.jsonl"), "-w", str(tmp_path / "ws"), "--no-scrub"])
    assert r.exit_code == 4
    assert "log path not found" in r.stderr and "Traceback" not in r.output
    r = runner.invoke(app, ["collect", str(tmp_path), "-w", str(tmp_path / "ws"), "--set", "collect.bogus=1"])
    assert r.exit_code == 2 and "collect.bogus: unknown key" in r.stderr


def test_validate_reports_every_problem(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("collect:\n  strict: 3\n  nope: 1\n")
    r = runner.invoke(app, ["validate", str(f)])
    assert r.exit_code == 2
    assert "2 problems" in r.stderr and "collect.strict" in r.stderr and "collect.nope: unknown key" in r.stderr
    f.write_text("collect:\n  strict: true\n")
    r = runner.invoke(app, ["validate", str(f)])  # well-formed, but run would have no log to read
    assert r.exit_code == 2 and "collect.paths: no log file or folder given" in r.stderr
    (tmp_path / "log.jsonl").write_text("")
    f.write_text(f"collect:\n  strict: true\n  paths: [{tmp_path / 'log.jsonl'}]\n")
    r = runner.invoke(app, ["validate", str(f)])
    assert r.exit_code == 0 and "OK" in r.stdout


def test_demo_data_then_run_pipeline(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text(f"workspace: {tmp_path / 'ws'}\ndemo_data:\n  output: {tmp_path / 'd.jsonl'}\n  sessions: 8\n"
                 f"collect:\n  paths: [{tmp_path / 'd.jsonl'}]\nscrub:\n  enabled: false\n")
    r = runner.invoke(app, ["run", str(p), "--json", "--until", "collect"])
    assert r.exit_code == 0, r.output
    stages = {s["stage"]: s for s in json.loads(r.stdout)["stages"]}
    assert stages["demo-data"]["status"] == "ran" and stages["collect"]["status"] == "ran"
    r = runner.invoke(app, ["run", str(p), "--json", "--until", "collect"])
    stages = {s["stage"]: s for s in json.loads(r.stdout)["stages"]}
    assert stages["demo-data"]["status"] == "skipped" and stages["collect"]["status"] == "skipped"
