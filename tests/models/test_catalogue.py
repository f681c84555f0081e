"""The catalogue is data a user trusts: complete entries, consistent numbers, clear lookups."""

import json

import pytest
from typer.testing import CliRunner

from slmconvert.cli import app
from slmconvert.models.catalogue import UnknownModel, load_catalogue, validate_catalogue
from slmconvert.errors import ConfigError

runner = CliRunner()


def test_models_list_json_has_at_least_20_loadable_entries():
    r = runner.invoke(app, ["models", "list", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert len(rows) >= 20
    families = {x["family"] for x in rows}
    assert {"SmolLM2", "Qwen2.5", "Qwen3", "Llama-3.2", "Phi-3.5", "Gemma-3", "xLAM-2", "Hymba", "Nemotron"} <= families
    for x in rows:
        assert x["sources"]["hub"] or x["sources"]["pypi"]
        assert isinstance(x["available"], bool) and x["availability"]


def test_numbers_are_consistent_and_scores_cite_a_source():
    for m in load_catalogue().models:
        assert m.memory_gb.bf16 == pytest.approx(2 * m.params_b, rel=0.05), m.name
        assert m.memory_gb.int4 == pytest.approx(0.5 * m.params_b, rel=0.1), m.name
        for s in m.scores:
            assert s.source.startswith("https://") and 0 < s.value <= 100


def test_lookup_by_alias_and_unknown_name():
    cat = load_catalogue()
    assert cat.get("SmolLM2").name == "smollm2-135m-instruct"
    with pytest.raises(UnknownModel, match=r"Unknown model: 'gpt-5' \(known: smollm2-135m-instruct, "):
        cat.get("gpt-5")
    r = runner.invoke(app, ["models", "show", "gpt-5"])
    assert r.exit_code == 2 and "Unknown model: 'gpt-5'" in r.stderr


def test_show_prints_facts_and_sources():
    r = runner.invoke(app, ["models", "show", "llama-3.2-1b-instruct"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "llama3.2" in r.stdout and "131,072" in r.stdout and "BFCL V2 25.7" in r.stdout
    assert "https://huggingface.co/meta-llama/Llama-3.2-1B-Instruct" in r.stdout


def test_bad_catalogue_entries_are_reported_with_key_paths():
    bad = {"models": [{"name": "a", "family": "x", "params_b": 0, "licence": "mit", "sources": {}},
                      {"name": "a", "family": "x", "params_b": 1, "licence": "mit", "sources": {"hub": "o/a"},
                       "scores": [{"benchmark": "IFEval", "value": 50, "source": "a blog"}]}]}
    with pytest.raises(ConfigError) as e:
        validate_catalogue(bad, "cat.yaml")
    text = str(e.value)
    assert "models.0.params_b" in text and "models.1.scores.0.source" in text
