"""Checks that need more than the config's shape: every shipped YAML by its kind, and a pipeline's
references (logs, tools file, policy, catalogue, prices, models) before any stage runs.

`preflight` collects every problem at once, each with its key path, so `slmconvert validate` and
`slmconvert run` say everything that is wrong in one go, instead of one problem per run and some
of them after minutes of earlier stages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from slmconvert.collect.formats import log_formats
from slmconvert.collect.textactions import load_rules
from slmconvert.collect.tools import load_tools_file
from slmconvert.config import PipelineConfig, apply_overrides, build_config
from slmconvert.configs import VALIDATORS
from slmconvert.errors import ConfigError, SlmconvertError
from slmconvert.evaluate.prices import load_prices
from slmconvert.models.catalogue import UnknownModel, load_catalogue
from slmconvert.scrub.policy import load_policy
from slmconvert.sources import PYPI_PREFIX, resolve_source

# Which stages read which references: a check runs only when one of its stages will run.
_COLLECT = {"collect", "scrub"}
_MODELS = {"select", "finetune", "evaluate"}


def validate_config_file(path: Path, data: dict, overrides: list[str]) -> dict:
    """Validate one YAML by its `kind` (none: a pipeline). Returns the resolved content."""
    kind = data.get("kind")
    if kind is None:
        return build_config(apply_overrides(data, overrides), str(path)).model_dump(mode="json")
    if kind not in VALIDATORS:
        raise ConfigError(str(path), [f"kind: unknown kind {kind!r} (known: {', '.join(sorted(VALIDATORS))}, or none for a pipeline)"])
    body = {k: v for k, v in apply_overrides(data, overrides).items() if k != "kind"}
    result = VALIDATORS[kind](body, str(path))
    return result.model_dump(mode="json") if hasattr(result, "model_dump") else result


def _problem(key: str, fn: Callable[[], Any], problems: list[str]) -> Any:
    try:
        return fn()
    except ConfigError as e:
        where = f"{key}: " if e.source in (key, "") else f"{key}: {e.source}: "
        problems.extend(p if p.startswith(key) else where + p for p in e.problems)
    except SlmconvertError as e:
        problems.append(f"{key}: {e}")
    return None


def preflight(config: PipelineConfig, stages: set[str] | None = None) -> list[str]:
    """Every problem with what the pipeline refers to, each with its key path (empty: all good)."""
    stages = set(stages) if stages is not None else {"collect", "scrub", "cluster", "select", "finetune", "evaluate"}
    problems: list[str] = []
    generated = {str(Path(config.demo_data.output))} if config.demo_data else set()
    if stages & _COLLECT:
        cc = config.collect
        if not cc.paths:
            problems.append("collect.paths: no log file or folder given")
        for i, p in enumerate(cc.paths):
            if str(Path(p)) not in generated and not Path(p).expanduser().exists():
                problems.append(f"collect.paths[{i}]: {p}: no such file or folder")
        if cc.format is not None and cc.format not in log_formats.names():
            problems.append(f"collect.format: unknown log format {cc.format!r} (known: {', '.join(log_formats.names())})")
        if cc.tools_file:
            _problem("collect.tools_file", lambda: load_tools_file(cc.tools_file), problems)
        _problem("collect.text_actions", lambda: load_rules(cc.text_actions), problems)
        if config.scrub.enabled:
            _problem("scrub.policy", lambda: load_policy(config.scrub.policy), problems)
    if "cluster" in stages and config.cluster.embedding_model.startswith((PYPI_PREFIX, ".", "/", "~")):
        _problem("cluster.embedding_model", lambda: resolve_source(config.cluster.embedding_model, "cluster.embedding_model"), problems)
    if stages & _MODELS:
        catalogue = _problem("select.catalogue", lambda: load_catalogue(config.select.catalogue), problems)
        if catalogue is not None:
            for key, names in (("select.models", config.select.models or []), ("select.local_models", list(config.select.local_models))):
                for name in names:
                    _problem(f"{key}.{name}", lambda n=name: catalogue.get(n), problems)
            for name, folder in config.select.local_models.items():
                if not Path(folder).expanduser().is_dir():
                    problems.append(f"select.local_models.{name}: {folder}: no such folder")
            for i, ref in enumerate(config.finetune.models or []):
                _model_reference(f"finetune.models[{i}]", ref, catalogue, problems)
    if "evaluate" in stages:
        _problem("evaluate.prices", lambda: load_prices(config.evaluate.prices), problems)
    return problems


def _model_reference(key: str, ref: str, catalogue, problems: list[str]) -> None:
    """A catalogue name or alias, a pypi: file, a local folder, or an org/name hub id."""
    try:
        catalogue.get(ref)
        return
    except UnknownModel as e:
        unknown = str(e)
    if ref.startswith(PYPI_PREFIX) or ref.startswith((".", "/", "~")):
        _problem(key, lambda: resolve_source(ref, key), problems)
    elif ref.count("/") != 1:  # not a hub id either
        problems.append(f"{key}: {unknown}")


def check_pipeline(config: PipelineConfig, source: str, stages: set[str] | None = None) -> None:
    """Raise one ConfigError listing every problem `preflight` finds."""
    problems = preflight(config, stages)
    if problems:
        raise ConfigError(source, problems)
