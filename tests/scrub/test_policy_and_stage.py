import json

import pytest

from slmconvert.collect.stage import run as collect
from slmconvert.errors import ConfigError, StageError
from slmconvert.scrub.policy import load_policy
from slmconvert.scrub.stage import run as scrub_stage
from slmconvert.store import load_invocations
from slmconvert.workspace import Workspace
from tests.conftest import rr_record, write_jsonl
from tests.scrub.conftest import make_inv


def test_policy_actions_mask_keep_drop(scrub, tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text("kind: scrub-policy\nentities:\n  EMAIL_ADDRESS: {action: mask}\n  PERSON: {action: keep}\n"
                      "  CREDIT_CARD: {action: drop}\nallow_list: [Northwind]\n")
    keep = make_inv([{"role": "user", "content": "I am Ann Lee, ann.lee@example.com, from Northwind"}], content="ok", n=0)
    drop = make_inv([{"role": "user", "content": "card 4111 1111 1111 1111"}], content="ok", session="s2", n=1)
    out, report = scrub([keep, drop], policy=str(policy))
    assert len(out) == 1 and report["dropped_invocations"] == 1
    text = out[0].request.messages[0]["content"]
    assert "Ann Lee" in text and "Northwind" in text
    assert "ann.lee@example.com" not in text and re.search(r"\*+\.com", text)
    assert report["entities"]["PERSON"]["kept"] >= 1


def test_policy_files_validate_and_errors_name_the_key(tmp_path):
    assert load_policy("default").rule("PERSON").action == "replace"
    assert load_policy("strict").rule("LOCATION").action == "replace"
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: scrub-policy\nentities:\n  PERSN: {action: replace}\n  EMAIL_ADDRESS: {action: shred}\n")
    with pytest.raises(ConfigError) as e:
        load_policy(str(bad))
    text = str(e.value)
    assert "entities.EMAIL_ADDRESS.action" in text and "shred" in text
    with pytest.raises(ConfigError, match="unknown policy 'nope'"):
        load_policy("nope")


def test_missing_spacy_model_is_a_clear_error(scrub, tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text("kind: scrub-policy\nspacy_model: xx_not_installed_model\n")
    with pytest.raises(StageError, match="spaCy model 'xx_not_installed_model' is not installed.*pip install"):
        scrub([make_inv([{"role": "user", "content": "Hello there, I am Ann Lee."}], content="hi")], policy=str(policy))


def _log(tmp_path):
    return write_jsonl(tmp_path / "log.jsonl", [
        rr_record("My email is zed.quill@example.org, I'm Zed Quillington", answer="Thanks Zed", session="1"),
        rr_record("Call me at 415-555-0199", answer="Will do", session="2"),
    ])


def test_collect_scrubs_by_default_and_raw_pii_never_lands(tmp_path):
    from slmconvert.config import load_config

    log = _log(tmp_path)
    cfg = load_config(None, [f"workspace={json.dumps(str(tmp_path / 'ws'))}", f"collect.paths={json.dumps([str(log)])}"])
    ws = Workspace(cfg.workspace)
    m = collect(cfg, ws)
    assert m.extra["scrub"]["enabled"] is True
    dump = json.dumps([i.to_dict() for i in load_invocations(ws)])
    for raw in ("zed.quill@example.org", "Quillington", "415-555-0199"):
        assert raw not in dump
    report = json.loads((ws.stage_dir("collect") / "scrub_report.json").read_text())
    assert report["entities"]["EMAIL_ADDRESS"]["values"] == 1 and report["entities"]["PHONE_NUMBER"]["values"] == 1
    assert all("example.org" not in ex for exs in report["examples"].values() for ex in exs)


def test_scrub_stage_on_a_raw_workspace(tmp_path, collect_config):
    cfg = collect_config(_log(tmp_path))  # scrubbing off
    ws = Workspace(cfg.workspace)
    collect(cfg, ws)
    assert any("zed.quill@example.org" in (i.request.messages[-1]["content"] or "") for i in load_invocations(ws))
    cfg = cfg.model_copy(update={"scrub": cfg.scrub.model_copy(update={"enabled": True})})
    m = scrub_stage(cfg, ws)
    assert m.status == "ran" and m.counts["invocations"] == 2
    assert ws.invocation_stage() == "scrub"
    assert "zed.quill@example.org" not in json.dumps([i.to_dict() for i in load_invocations(ws)])
    assert scrub_stage(cfg, ws).status == "skipped"
    # new raw data arrives: the scrubbed copy is stale, and later stages are told so
    more = write_jsonl(tmp_path / "more.jsonl", [rr_record("I'm Yolanda Brightwater", answer="Hi", session="3")])
    collect(collect_config(_log(tmp_path), more), ws)
    with pytest.raises(StageError, match="older than"):
        ws.invocation_stage()
    assert scrub_stage(cfg, ws).counts["invocations"] == 3


import re  # noqa: E402


def test_collect_rejects_an_unknown_policy_before_reading_even_when_no_record_parses(tmp_path):
    from slmconvert.config import load_config

    log = tmp_path / "log.jsonl"
    log.write_text("{not json\n")
    cfg = load_config(None, [f"workspace={json.dumps(str(tmp_path / 'ws'))}", f"collect.paths={json.dumps([str(log)])}",
                             "scrub.policy=nosuch"])
    with pytest.raises(ConfigError, match="unknown policy 'nosuch'"):
        collect(cfg, Workspace(tmp_path / "ws"))
    assert not (tmp_path / "ws" / "invocations").exists()
