"""`slmconvert export`: what a serving engine loads is what the workspace trained and evaluated."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from slmconvert.export import ExportError, _permute_rows, export
from slmconvert.io import read_json, sha256_file
from slmconvert.workspace import Workspace
from tests.evaluate.conftest import tuned_ws  # noqa: F401  (the shared fine-tuned demo workspace)


@pytest.fixture(scope="module")
def trained(tuned_ws):
    """The evaluate tests' demo workspace: a LoRA adapter per call site on a tiny Llama (exports only read it)."""
    from slmconvert.workspace import Workspace

    ws, cfg = tuned_ws
    folder = Path(cfg.finetune.models[0])
    return ws, folder, cfg, Workspace(ws).read_manifest("finetune")


def _logits(model, tok):
    ids = tok("<|im_start|>user\nWhere is order 7?<|im_end|>\n", return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


def test_vllm_adapters_load_onto_the_base_and_give_the_workspace_logits(trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ws, folder, cfg, m = trained
    out = tmp_path / "vllm"
    manifest = export(Workspace(ws), "vllm", out, cfg)
    assert len(manifest["sites"]) == len({a["site"] for a in m.extra["adapters"]}) == 3
    tok = AutoTokenizer.from_pretrained(folder)
    for a in m.extra["adapters"]:
        info = manifest["sites"][a["site"]]
        assert info["engine"] == "vllm"  # serve sends vLLM's own sampling fields
        exported = out / info["adapter"]
        conf = read_json(exported / "adapter_config.json")
        assert conf["base_model_name_or_path"] == str(folder.resolve())  # the catalogue's reference, never a cache path
        ours = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), ws / a["path"] / "adapter").eval()
        theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(conf["base_model_name_or_path"]), exported).eval()
        base = AutoModelForCausalLM.from_pretrained(folder).eval()
        assert torch.allclose(_logits(ours, tok), _logits(theirs, tok))
        assert not torch.allclose(_logits(base, tok), _logits(theirs, tok))  # the adapter changes the answer
    script = (out / "serve.sh").read_text()
    assert f"vllm serve {folder.resolve()}" in script and "--enable-lora" in script and "--max-lora-rank 16" in script
    assert script.count("=adapters/slm-") == 3 and "--tool-call-parser hermes" in script
    assert all(sha256_file(out / f) == h for f, h in manifest["files"].items() if f != "manifest.json")
    assert "slmconvert serve" in (out / "README.md").read_text()


def test_vllm_refuses_what_it_cannot_load(trained, tmp_path):
    ws, folder, cfg, m = trained
    copy = tmp_path / "ws"
    shutil.copytree(ws, copy)
    conf_path = copy / m.extra["adapters"][0]["path"] / "adapter" / "adapter_config.json"
    conf = read_json(conf_path)
    conf_path.write_text(json.dumps({**conf, "modules_to_save": ["lm_head"]}))
    with pytest.raises(ExportError, match="modules_to_save.*--to merged"):
        export(Workspace(copy), "vllm", tmp_path / "out", cfg)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial*"))  # nothing half-written
    conf_path.write_text(json.dumps({**conf, "r": 1024}))
    with pytest.raises(ExportError, match="rank 1024"):
        export(Workspace(copy), "vllm", tmp_path / "out", cfg)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export(Workspace(ws), "vllm", tmp_path / "taken", cfg)
    with pytest.raises(ExportError, match="no fine-tuned adapters"):
        export(Workspace(tmp_path / "nothing"), "vllm", tmp_path / "o2", cfg)


def test_gguf_lora_reads_back_with_the_adapter_tensors(trained, tmp_path):
    import gguf
    from safetensors.torch import load_file

    ws, folder, cfg, m = trained
    out = tmp_path / "cpp"
    manifest = export(Workspace(ws), "llamacpp", out, cfg)
    a = m.extra["adapters"][0]
    info = manifest["sites"][a["site"]]
    assert info["engine"] == "llamacpp"
    reader = gguf.GGUFReader(str(out / info["lora"]))
    fields = {f.name: f for f in reader.fields.values()}
    assert bytes(fields["general.type"].parts[-1]).decode() == "adapter"
    assert bytes(fields["adapter.type"].parts[-1]).decode() == "lora"
    conf = read_json(ws / a["path"] / "adapter" / "adapter_config.json")
    assert float(fields["adapter.lora.alpha"].parts[-1][0]) == conf["lora_alpha"]
    got = {t.name: t.data for t in reader.tensors}
    src = load_file(str(ws / a["path"] / "adapter" / "adapter_model.safetensors"))
    assert len(got) == len(src)
    base_cfg = read_json(folder / "config.json")
    for key, tensor in src.items():
        layer = key.split("layers.")[1].split(".")[0]
        proj = key.split(".")[-3]
        gname = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                 "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[proj]
        part = "lora_a" if "lora_A" in key else "lora_b"
        want = tensor.float().numpy()
        if part == "lora_b" and proj in ("q_proj", "k_proj"):  # llama.cpp's rotary row order, as for the base weight
            heads = base_cfg["num_attention_heads"] if proj == "q_proj" else base_cfg["num_key_value_heads"]
            want = _permute_rows(want, heads)
        assert got[f"blk.{layer}.{gname}.weight.{part}"].shape == want.shape
        assert (got[f"blk.{layer}.{gname}.weight.{part}"] == want).all(), key
    assert f"--lora {info['lora']}" in (out / "serve.sh").read_text() and "--lora-init-without-apply" in (out / "serve.sh").read_text()


def test_permuting_the_lora_b_rows_permutes_the_weight_update():
    a, b = torch.randn(4, 32).numpy(), torch.randn(32, 4).numpy()
    assert ((_permute_rows(b, 4) @ a) == _permute_rows(b @ a, 4)).all()


def test_ollama_modelfiles_render(trained, tmp_path):
    ws, folder, cfg, m = trained
    out = tmp_path / "ollama"
    manifest = export(Workspace(ws), "ollama", out, cfg)
    for site, info in manifest["sites"].items():
        text = (out / info["modelfile"]).read_text()
        lines = text.splitlines()
        assert f"FROM {folder}" in lines and "ADAPTER ./adapter.gguf" in lines and info["engine"] == "ollama"
        # the decoding the policy was verified with, also for whoever calls Ollama directly (its default penalises repeats)
        assert "PARAMETER temperature 0" in lines and "PARAMETER repeat_penalty 1" in lines
        assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}' in text and 'PARAMETER stop "<|im_end|>"' in lines
        assert site in text and (out / info["modelfile"]).with_name("adapter.gguf").stat().st_size > 0
    assert (out / "create.sh").read_text().count("ollama create slm-") == 3


def test_merged_models_give_the_adapter_logits(trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ws, folder, cfg, m = trained
    out = tmp_path / "merged"
    manifest = export(Workspace(ws), "merged", out, cfg)
    a = m.extra["adapters"][0]
    merged = AutoModelForCausalLM.from_pretrained(out / manifest["sites"][a["site"]]["folder"]).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    tok = AutoTokenizer.from_pretrained(out / manifest["sites"][a["site"]]["folder"])
    ours = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), ws / a["path"] / "adapter").eval()
    assert torch.allclose(_logits(ours, tok), _logits(merged, tok), atol=1e-5)


def test_cli_export(trained, tmp_path):
    from typer.testing import CliRunner

    from slmconvert.cli import app

    ws, folder, cfg, m = trained
    r = CliRunner().invoke(app, ["export", str(tmp_path / "o"), "--to", "vllm", "-w", str(ws), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["target"] == "vllm"
    r = CliRunner().invoke(app, ["export", str(tmp_path / "o2"), "--to", "tensorrt", "-w", str(ws)])
    assert r.exit_code != 0 and "unknown export target 'tensorrt'" in r.output and "Traceback" not in r.output
