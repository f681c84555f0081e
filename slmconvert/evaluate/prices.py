"""LLM list prices (`configs/prices.yaml`, `kind: llm-prices`): what a moved call would have cost."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from slmconvert.config import format_error, load_yaml
from slmconvert.configs import configs_dir, register_kind
from slmconvert.errors import ConfigError


class Price(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    input: float = Field(ge=0, description="USD per million prompt tokens.")
    output: float = Field(ge=0, description="USD per million completion tokens.")
    cached_input: float | None = Field(None, ge=0)
    source: str | None = None


class PriceTable(BaseModel):
    model_config = ConfigDict(extra="forbid")

    as_of: str
    currency: str = "USD"
    models: list[Price]

    def lookup(self, model: str | None) -> Price | None:
        """The longest entry the model name starts with (`gpt-4o-2024-08-06` -> gpt-4o), case-insensitive."""
        if not model:
            return None
        key = model.lower().split("/")[-1]  # "openai/gpt-4o" -> "gpt-4o"
        hits = [p for p in self.models if key == p.name.lower() or key.startswith(p.name.lower() + "-")]
        return max(hits, key=lambda p: len(p.name)) if hits else None

    def cost(self, model: str | None, prompt_tokens: float, completion_tokens: float) -> float | None:
        p = self.lookup(model)
        if p is None:
            return None
        return (prompt_tokens * p.input + completion_tokens * p.output) / 1e6


def default_prices_path() -> Path:
    return configs_dir() / "prices.yaml"


@register_kind("llm-prices")
def validate_prices(data: dict, source: str) -> PriceTable:
    try:
        table = PriceTable.model_validate(data)
    except ValidationError as e:
        raise ConfigError(source, [format_error(err) for err in e.errors()]) from None
    seen: dict[str, int] = {}
    problems = []
    for i, p in enumerate(table.models):
        if p.name.lower() in seen:
            problems.append(f"models.{i}.name: {p.name!r} is already listed as models.{seen[p.name.lower()]}")
        seen[p.name.lower()] = i
    if problems:
        raise ConfigError(source, problems)
    return table


def load_prices(path: str | Path | None = None) -> PriceTable:
    p = Path(path) if path else default_prices_path()
    data = load_yaml(p)
    if data.get("kind") != "llm-prices":
        raise ConfigError(str(p), [f"kind: expected 'llm-prices', got {data.get('kind')!r}"])
    return validate_prices({k: v for k, v in data.items() if k != "kind"}, str(p))
