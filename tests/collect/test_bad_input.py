"""Bad logs: good records are kept, each bad one is quarantined with file, line and reason."""

import json

import pytest

from slmconvert.collect.stage import CollectStrictError, run
from slmconvert.errors import FormatError, StageError
from slmconvert.io import read_jsonl
from slmconvert.workspace import Workspace
from tests.conftest import rr_record, write_jsonl


def quarantine(ws: Workspace):
    return read_jsonl(ws.stage_dir("collect") / "quarantine.jsonl")


def test_jsonl_bad_lines_are_quarantined_and_good_ones_kept(tmp_path, collect_config):
    bad_role = rr_record("x", answer="y", session="r")
    bad_role["request"]["messages"].append({"role": "wizard", "content": "?"})
    wrong_type = rr_record("x", answer="y", session="w")
    wrong_type["request"]["messages"] = "not a list"
    bad_args = rr_record("x", call=("f", "{not json"), session="j")
    no_choices = rr_record("x", answer="y", session="n")
    no_choices["response"] = {"choices": []}
    lines = [
        rr_record("good 1", answer="ok", session="g1"),
        '{"request": {"messages": [}',  # malformed JSON
        bad_role, wrong_type, bad_args, no_choices,
        rr_record("good 2", answer="ok", session="g2"),
    ]
    log = write_jsonl(tmp_path / "log.jsonl", lines)
    with open(log, "ab") as f:
        f.write(b'{"request": {"messages": [{"role": "user", "content": "caf\xe9"}]}, "response": {}}\n')  # latin-1
        f.write(b'{"request": {"messages": [{"role": "user"')  # truncated last line
    cfg = collect_config(log)
    ws = Workspace(cfg.workspace)
    m = run(cfg, ws)
    assert m.counts["invocations"] == 2
    q = {e["locator"]: e for e in quarantine(ws)}
    assert set(q) == {"line 2", "line 3", "line 4", "line 5", "line 6", "line 8", "line 9"}
    assert q["line 2"]["code"] == "malformed_json"
    assert "unknown role 'wizard'" in q["line 3"]["reason"]
    assert "messages must be a list" in q["line 4"]["reason"]
    assert q["line 5"]["code"] == "invalid_tool_arguments"
    assert "choices is empty" in q["line 6"]["reason"]
    assert q["line 8"]["code"] == "invalid_utf8"
    assert q["line 9"]["code"] == "truncated"
    assert all(e["file"] == str(log) for e in q.values())
    assert m.counts["quarantined"] == 7 and m.counts["dropped_malformed_json"] == 1
    # quarantine entries locate the record; they never copy its (possibly personal) content
    assert "caf" not in (ws.stage_dir("collect") / "quarantine.jsonl").read_text()


def test_truncated_json_array_keeps_complete_elements(tmp_path, collect_config):
    convs = [{"id": i, "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(3)]
    text = json.dumps(convs, indent=1)
    f = tmp_path / "cut.json"
    f.write_text(text[: int(len(text) * 0.8)])
    cfg = collect_config(f)
    ws = Workspace(cfg.workspace)
    m = run(cfg, ws)
    assert m.counts["invocations"] == 2
    (entry,) = quarantine(ws)
    assert entry["locator"] == "index 2" and entry["code"] == "truncated"


def test_empty_file_no_format_and_missing_path(tmp_path, collect_config):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    good = write_jsonl(tmp_path / "good.jsonl", [rr_record("q", answer="a")])
    cfg = collect_config(empty, good)
    m = run(cfg, Workspace(cfg.workspace))
    assert m.counts["invocations"] == 1 and m.counts["dropped_empty_file"] == 1

    other = write_jsonl(tmp_path / "metrics.jsonl", [{"cpu": 0.5}, {"cpu": 0.7}])
    cfg = collect_config(other, ws=tmp_path / "ws2")
    with pytest.raises(FormatError, match=r"metrics.jsonl: matches no known log format \(tried: otel, langfuse, langsmith, litellm, openai-batch, request-response, openai-finetune, trajectory\)"):
        run(cfg, Workspace(cfg.workspace))
    cfg = collect_config(tmp_path / "nope.jsonl", ws=tmp_path / "ws3")
    with pytest.raises(StageError, match="log path not found: .*nope.jsonl"):
        run(cfg, Workspace(cfg.workspace))


def test_directory_of_mixed_files(tmp_path, collect_config):
    d = tmp_path / "logs"
    write_jsonl(d / "gateway.jsonl", [rr_record("q1", answer="a1", session="1")])
    (d / "sub").mkdir()
    (d / "sub" / "convs.json").write_text(json.dumps([{"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}], "id": 9}]))
    write_jsonl(d / "ft.jsonl", [{"messages": [{"role": "user", "content": "q3"}, {"role": "assistant", "content": "a3"}]}])
    (d / "README.md").write_text("not a log")
    cfg = collect_config(d)
    m = run(cfg, Workspace(cfg.workspace))
    assert m.counts["invocations"] == 3 and m.counts["files"] == 3
    assert m.extra["formats"] == {"request-response": 1, "trajectory": 1, "openai-finetune": 1}
    assert m.extra["skipped_files"] == [str(d / "README.md")]


def test_strict_fails_and_stores_nothing(tmp_path, collect_config):
    log = write_jsonl(tmp_path / "log.jsonl", [rr_record("q", answer="a"), "{oops"])
    cfg = collect_config(log, strict=True)
    ws = Workspace(cfg.workspace)
    with pytest.raises(CollectStrictError, match=r"1 bad record.*line 2"):
        run(cfg, ws)
    assert ws.read_manifest("collect") is None
    assert read_jsonl(ws.stage_dir("collect") / "quarantine.strict.jsonl")[0]["locator"] == "line 2"
