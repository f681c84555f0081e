"""Shipped configuration files (configs/): where they are, and the registry of their kinds.

A file in configs/ names its kind at the top (`kind: scrub-policy`); a file without `kind` is a
pipeline. Each kind's module registers its validator here with `@register_kind(...)`; this
module imports none of them (validation.py brings them together).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

VALIDATORS: dict[str, Callable[[dict, str], Any]] = {}


def register_kind(kind: str):
    def deco(fn):
        VALIDATORS[kind] = fn
        return fn

    return deco


def configs_dir() -> Path:
    """The shipped configs/: $SLMCONVERT_CONFIGS, the source checkout's, or the installed copy."""
    if os.environ.get("SLMCONVERT_CONFIGS"):
        return Path(os.environ["SLMCONVERT_CONFIGS"])
    checkout = Path(__file__).resolve().parents[1] / "configs"
    if (checkout / "models.yaml").is_file():
        return checkout
    for prefix in (sys.prefix, sys.base_prefix, os.path.expanduser("~/.local")):
        installed = Path(prefix) / "share" / "slmconvert" / "configs"
        if (installed / "models.yaml").is_file():
            return installed
    return checkout
