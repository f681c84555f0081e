"""Fine-tuned models as `evaluate` and `serve` load them: one base model in memory per catalogue model
with every site's LoRA adapter attached by name (switched per request or per batch), or the whole
model a full fine-tuning saved. One loader for both, so what evaluate scored is what serve runs.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any


def attach(base, model, weights: Path, name: str):
    """`base` with the LoRA adapter at `weights` attached as `name`; `model` is the PeftModel built by an
    earlier call (or None). Returns the PeftModel, with `name` active."""
    from peft import PeftModel

    with warnings.catch_warnings():  # peft asks transformers 5 for a renamed attribute
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        if model is None:
            model = PeftModel.from_pretrained(base, str(weights), adapter_name=name)
        else:
            model.load_adapter(str(weights), adapter_name=name)
    model.set_adapter(name)
    model.eval()
    return model


def load_full(weights: Path, device: str, with_tokenizer: bool = False) -> Any:
    """A whole fine-tuned model (full fine-tuning), from its folder only; with its tokenizer if asked."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(weights, local_files_only=True).to(device).eval()
    if with_tokenizer:
        return model, AutoTokenizer.from_pretrained(weights, local_files_only=True)
    return model


def adapter_name(fingerprint: str) -> str:
    """The name an adapter is attached under: stable per trained artefact."""
    return "a" + fingerprint[:12]
