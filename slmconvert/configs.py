"""Validation of every shipped YAML: pipelines and the catalogues/policies in configs/."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from slmconvert.errors import ConfigError

# A file in configs/ names its kind at the top (`kind: scrub-policy`); a file without `kind`
# is a pipeline.
VALIDATORS: dict[str, Callable[[dict, str], Any]] = {}


def register_kind(kind: str):
    def deco(fn):
        VALIDATORS[kind] = fn
        return fn

    return deco


def validate_config_file(path: Path, data: dict, overrides: list[str]) -> dict:
    from slmconvert.config import apply_overrides, build_config

    kind = data.get("kind")
    if kind is None:
        return build_config(apply_overrides(data, overrides), str(path)).model_dump(mode="json")
    _load_validators()
    if kind not in VALIDATORS:
        raise ConfigError(str(path), [f"kind: unknown kind {kind!r} (known: {', '.join(sorted(VALIDATORS))}, or none for a pipeline)"])
    body = {k: v for k, v in apply_overrides(data, overrides).items() if k != "kind"}
    result = VALIDATORS[kind](body, str(path))
    return result.model_dump(mode="json") if hasattr(result, "model_dump") else result


def _load_validators() -> None:
    import slmconvert.models.catalogue  # noqa: F401  (registers model-catalogue)
    import slmconvert.scrub.policy  # noqa: F401  (registers scrub-policy)
    import slmconvert.evaluate.prices  # noqa: F401  (registers llm-prices)
