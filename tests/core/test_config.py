import pytest

from slmconvert.config import load_config
from slmconvert.validation import validate_config_file
from slmconvert.config import load_yaml
from slmconvert.errors import ConfigError
from tests.conftest import REPO

SHIPPED = sorted((REPO / "pipelines").glob("*.yaml")) + sorted((REPO / "configs").rglob("*.yaml"))


def test_there_are_shipped_yaml_files():
    assert any(p.parent.name == "pipelines" for p in SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_yaml_is_valid(path):
    validate_config_file(path, load_yaml(path), [])


@pytest.mark.parametrize("path", sorted((REPO / "pipelines").glob("*.yaml")), ids=lambda p: p.name)
def test_every_pipeline_starts_with_the_command_that_runs_it(path):
    first = path.read_text().splitlines()[0]
    assert first == f"# slmconvert run pipelines/{path.name}"


def test_all_problems_are_reported_at_once_with_key_paths(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("collect:\n  strickt: true\n  recursive: maybe\nscrub:\n  batch_size: 0\nbogus: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    problems = e.value.problems
    assert len(problems) == 4
    text = str(e.value)
    assert "collect.strickt: unknown key (valid: paths, format" in text
    assert "collect.recursive: Input should be a valid boolean" in text and "'maybe'" in text
    assert "scrub.batch_size: Input should be greater than or equal to 1" in text
    assert "bogus: unknown key" in text


def test_set_overrides_yaml_which_overrides_defaults(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("workspace: ws-from-yaml\ncollect:\n  strict: true\n  paths: [a.jsonl]\n")
    cfg = load_config(f, ["collect.strict=false", "scrub.seed=7"])
    assert cfg.workspace == "ws-from-yaml"
    assert cfg.collect.strict is False and cfg.collect.paths == ["a.jsonl"]
    assert cfg.scrub.seed == 7 and cfg.scrub.enabled is True  # default kept


def test_bad_set_and_bad_yaml_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["collect.strict"])
    with pytest.raises(ConfigError, match="collect.nope: unknown key"):
        load_config(None, ["collect.nope=1"])
    f = tmp_path / "broken.yaml"
    f.write_text("collect:\n  paths: [a\n")
    with pytest.raises(ConfigError, match="line 3"):
        load_config(f)
    f.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(f)


def test_validate_and_run_report_every_missing_reference_at_once_before_any_stage(tmp_path):
    """A missing log, tools file, policy, catalogue entry, local folder, prices file and unknown model:
    all listed with their key paths by `validate` and by `run`, and `run` does no work."""
    from typer.testing import CliRunner

    from slmconvert.cli import app

    f = tmp_path / "p.yaml"
    ws = tmp_path / "ws"
    f.write_text(f"workspace: {ws}\ncollect:\n  paths: [{tmp_path}/nope.jsonl]\n  tools_file: {tmp_path}/tools.json\n"
                 "scrub:\n  policy: nosuch\nselect:\n  models: [smollm2, nosuch-model]\n"
                 f"  local_models: {{qwen3-0.6b: {tmp_path}/qwen}}\nfinetune:\n  models: [gpt-9]\n"
                 f"evaluate:\n  prices: {tmp_path}/prices.yaml\n")
    expected = ["collect.paths[0]:", "collect.tools_file:", "scrub.policy: unknown policy 'nosuch'",
                "select.models.nosuch-model: Unknown model", "select.local_models.qwen3-0.6b:", "finetune.models[0]: Unknown model: 'gpt-9'",
                "evaluate.prices:"]
    runner = CliRunner()
    for args in (["validate", str(f)], ["run", str(f)]):
        r = runner.invoke(app, args, env={"COLUMNS": "400"})
        assert r.exit_code == 2, r.output
        assert "7 problems" in r.stderr and all(e in r.stderr for e in expected), r.stderr
    assert not ws.exists()  # no stage ran
    # --until collect only checks what collect needs
    r = runner.invoke(app, ["run", str(f), "--until", "collect"], env={"COLUMNS": "400"})
    assert "3 problems" in r.stderr and "finetune.models" not in r.stderr
