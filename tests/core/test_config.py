import pytest

from slmconvert.config import load_config
from slmconvert.configs import validate_config_file
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
