"""`finetune`: one adapter per (call site, candidate SLM), trained on the site's train split (paper step S5).

Each adapter lives in models/<site>/<model>/: adapter/ (weights + the tokenizer and chat
template used), recipe.json (prompt compaction), train_stats.json, training_log.jsonl, a
model card (README.md), and complete.json, written last, with the fingerprint of (site data,
model, config, recipe). A fingerprint that matches means the adapter is done and is skipped;
an interrupted run leaves checkpoints/ and resumes from the last one on the next run.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

from slmconvert.config import PipelineConfig
from slmconvert.errors import StageError
from slmconvert.io import read_json, sha256_obj, write_json_atomic, write_text_atomic
from slmconvert.progress import NULL_PROGRESS, Progress
from slmconvert.workspace import Manifest, Timer, Workspace

STAGE = "finetune"
COMPLETE = "complete.json"
TRAINING_VERSION = 1


def _slug(s: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-") or "model"


def adapter_dir(workspace: Workspace, site: str, model: str) -> Path:
    return workspace.stage_dir(STAGE) / _slug(site) / _slug(model)


WEIGHTS = ("adapter", "model")  # the trained weights: a PEFT adapter (lora, qlora) or a whole model (full)
ARTEFACTS = (*WEIGHTS, "merged")  # everything a finetune leaves in an adapter folder


def load_artefact(folder: Path) -> tuple[str, Path, dict[str, Any]] | None:
    """What the last finished finetune left in an adapter folder, read from its complete.json:
    ("adapter", PEFT folder, record) for LoRA/QLoRA, ("model", full model folder, record) for full
    fine-tuning; None when unfinished or when that artefact is gone. Readers (evaluate, serve)
    never guess from whichever sub-folder happens to exist."""
    done = Path(folder) / COMPLETE
    if not done.exists():
        return None
    record = read_json(done)
    kind = record.get("artefact") or next((f for f in record.get("files", []) if f in WEIGHTS), None)
    if kind is None:
        return None
    path = Path(folder) / kind
    marker = "adapter_config.json" if kind == "adapter" else "config.json"
    return (kind, path, record) if (path / marker).exists() else None


def plan(config: PipelineConfig, workspace: Workspace) -> dict[str, list[str]]:
    """site -> models to train: `finetune.models`, else select's top candidates."""
    from slmconvert.cluster.stage import load_tasks

    fc = config.finetune
    sites = list(load_tasks(workspace)["sites"])
    if fc.models:
        return {s: list(fc.models) for s in sites}
    if workspace.read_manifest("select") is None:
        raise StageError("finetune needs candidate models: run `slmconvert select` first, or name them with "
                         "--model NAME (finetune.models)")
    from slmconvert.select.stage import load_candidates

    cands = load_candidates(workspace)["sites"]
    return {s: cands.get(s, {}).get("candidates", [])[: fc.candidates_per_site] for s in sites}


def _fingerprint(ids: list[str], entry, fc, recipe) -> str:
    cfg = fc.model_dump(mode="json", exclude={"device", "merge", "checkpoint_steps", "models", "candidates_per_site"})
    if not cfg.get("history_loss"):  # off: adapters trained before the option existed (the answer-only loss) stay valid
        cfg.pop("history_loss", None)
    return sha256_obj({"ids": sorted(ids), "model": entry.model_dump(mode="json"), "config": cfg,
                       "recipe": recipe.to_dict(), "version": TRAINING_VERSION})


def _mix_lines(mix: dict | None) -> list[str]:
    if not mix:
        return []
    if mix.get("method") != "sqrt":
        return ["- examples drawn uniformly from the site's train split (finetune.balance: none)"]
    lines = [f"- examples drawn per task in proportion to the square root of its size, at most {mix['max_upweight']:g}x its "
             "traffic share, tool calls vs text replies as in traffic (finetune.balance: sqrt): a frequent tool no longer "
             "crowds out rare ones, which a small model otherwise replaces with the frequent one"]
    tasks = sorted(mix.get("tasks", {}).items(), key=lambda kv: -kv[1]["available"])
    lines += [f"  - {t}: {d['examples']} examples of {d['available']} ({100 * d['traffic_share']:.1f}% of traffic, "
              f"{100 * d['training_share']:.1f}% of training)" for t, d in tasks[:20]]
    if len(tasks) > 20:
        lines.append(f"  - ... {len(tasks) - 20} more tasks (finetune manifest: training_mix)")
    return lines


def model_card(site: str, entry, fc, recipe, data_stats: dict, stats: dict, info: dict, mix: dict | None = None) -> str:
    hp = {k: getattr(fc, k) for k in ("method", "lora_r", "lora_alpha", "lora_dropout", "epochs", "max_steps", "learning_rate",
                                      "batch_size", "grad_accum", "max_length")}
    lines = [f"# {entry.name} distilled for call site `{site}`", "",
             f"Base model: `{entry.name}` ({info.get('location')}), licence {entry.licence}. Trained by slmconvert "
             f"with trl SFTTrainer + peft on the LLM's logged responses (completion-only loss).", "",
             "## Data", "",
             f"- {data_stats['examples']} training examples (train split of the site), "
             f"{data_stats['prompt_tokens']:,} prompt and {data_stats['completion_tokens']:,} completion tokens",
             *_mix_lines(mix),
             *([f"- loss also on the {data_stats['history_turns']:,} earlier LLM answers the prompts' history windows show "
                f"({data_stats['history_tokens']:,} tokens; finetune.history_loss): the same forward passes teach more answers; "
                "on τ-bench a small model then replied in text where the LLM did far more often, at no cost to its tool calls"]
               if "history_turns" in data_stats else ["- loss on each example's answer only (finetune.history_loss: false)"]),
             *[f"- dropped ({k[8:]}): {v}" for k, v in data_stats.items() if k.startswith("dropped_")],
             *[f"- prompts fitted ({k[7:].replace('_', ' ')}): {v}" for k, v in data_stats.items() if k.startswith("fitted_")],
             f"- prompt compaction: {json.dumps(recipe.to_dict())}",
             *([f"- carried past the history window (the LLM copies these keys' values into its calls): "
                f"{', '.join(recipe.carry_keys)}, at most {recipe.max_carried} values"] if recipe.carry_keys else []), "",
             "## Hyper-parameters", "", *[f"- {k}: {v}" for k, v in hp.items()],
             f"- precision: {'bf16' if stats['bf16'] else 'fp32'}; packing: {stats['packing']}", "",
             "## Training", "",
             f"- steps {stats['steps']}, epochs {stats['epochs']}, {stats['seconds']} s, {stats['tokens_per_s']} tokens/s",
             f"- loss: first {stats['first_loss']}, last {stats['last_loss']}, mean {stats['train_loss']}",
             f"- resumed from: {stats['resumed_from'] or 'no (fresh run)'}", "",
             "Load it with peft: `PeftModel.from_pretrained(base, 'adapter')`; prompts must be compacted with recipe.json "
             "(`slmconvert serve` and `evaluate` do this).", ""]
    return "\n".join(lines)


def train_one(workspace: Workspace, config: PipelineConfig, site: str, model_name: str, train_invs: list, recipe,
              progress: Progress, mix: dict | None = None) -> dict[str, Any]:
    from slmconvert.chat import supports_native_tools
    from slmconvert.finetune.data import build_examples
    from slmconvert.finetune.trainer import CHECKPOINTS, pick_device, save_outputs, train_adapter
    from slmconvert.models.loading import load_model, resolve_model

    fc = config.finetune
    entry = resolve_model(model_name)
    out = adapter_dir(workspace, site, entry.name)
    fp = _fingerprint([i.id for i in train_invs], entry, fc, recipe)
    done = out / COMPLETE
    if done.exists() and read_json(done).get("fingerprint") == fp:
        return {**read_json(done), "status": "skipped"}
    ckpt = out / CHECKPOINTS
    stamp = ckpt / "fingerprint.json"
    if ckpt.exists() and (not stamp.exists() or read_json(stamp).get("fingerprint") != fp):
        shutil.rmtree(ckpt)  # checkpoints of other data or settings cannot be resumed
    done.unlink(missing_ok=True)
    device = pick_device(fc.device)
    if fc.method == "qlora" and not device.startswith("cuda"):
        raise StageError("finetune.method qlora needs a CUDA GPU (bitsandbytes 4-bit training); use lora on CPU")
    model, tok, info = load_model(entry, local_folder=config.select.local_models.get(entry.name), device=device, download_ok=config.select.download,
                                  dtype="bfloat16" if device.startswith("cuda") else "float32",
                                  quantization="4bit" if fc.method == "qlora" else None, for_training=True)
    native = supports_native_tools(tok)
    rows, data_stats = build_examples(train_invs, recipe, tok, fc.max_length, native, fc.history_loss)
    if not rows:
        raise StageError(f"finetune: no training example of site {site!r} fits finetune.max_length={fc.max_length} "
                         f"({data_stats})")
    for stale in ARTEFACTS:  # a folder holds exactly the artefact of its last finetune (lora -> full leaves no adapter/)
        shutil.rmtree(out / stale, ignore_errors=True)
    ckpt.mkdir(parents=True, exist_ok=True)
    write_json_atomic(stamp, {"fingerprint": fp})
    targets = fc.target_modules or entry.lora_target_modules
    stats = train_adapter(model, tok, rows, out, fc, device=device, target_modules=targets, progress=progress)
    files = save_outputs(stats, tok, out, fc.merge)
    public = {k: v for k, v in stats.items() if k not in ("trainer", "model", "log")}
    write_json_atomic(out / "recipe.json", recipe.to_dict())
    write_json_atomic(out / "train_stats.json", {**public, "data": data_stats, "device": device, "tool_format": "native" if native else "fallback",
                                                 "base": {"name": entry.name, **info}})
    write_text_atomic(out / "README.md", model_card(site, entry, fc, recipe, data_stats, stats, info, mix))
    shutil.rmtree(ckpt, ignore_errors=True)
    record = {"site": site, "model": entry.name, "model_ref": model_name, "path": str(out.relative_to(workspace.root)), "fingerprint": fp,
              "files": files + ["recipe.json", "train_stats.json", "README.md"], "examples": data_stats["examples"],
              "data": {k: v for k, v in data_stats.items() if k.startswith(("dropped_", "fitted_"))},
              "train_loss": public["train_loss"], "first_loss": public["first_loss"], "last_loss": public["last_loss"],
              "seconds": public["seconds"], "tokens_per_s": public["tokens_per_s"], "resumed_from": public["resumed_from"],
              "tool_format": "native" if native else "fallback", "method": fc.method,
              "artefact": next(f for f in files if f in WEIGHTS)}
    write_json_atomic(done, record)
    return {**record, "status": "ran"}


def site_data(config: PipelineConfig, workspace: Workspace) -> dict[str, dict[str, Any]]:
    """Per site: train invocations (capped, seeded) and the compaction recipe fitted on all its calls."""
    from slmconvert.cluster.stage import load_assignments
    from slmconvert.compaction import fit_site_recipe
    from slmconvert.store import load_invocations

    in_stage, _ = workspace.input_manifest("finetune")
    by_id = {i.id: i for i in load_invocations(workspace, in_stage)}
    sites: dict[str, dict[str, Any]] = {}
    for a in load_assignments(workspace):
        inv = by_id.get(a["invocation_id"])
        if inv is None:
            continue
        s = sites.setdefault(a["site"], {"all": [], "train": [], "tasks": []})
        s["all"].append(inv)
        if a["split"] == "train":
            s["train"].append(inv)
            s["tasks"].append(a["task"])
    cc, fc = config.compaction, config.finetune
    for s in sites.values():
        s["recipe"] = fit_site_recipe(cc, [i.request.messages for i in s["all"]], [i.request.tools for i in s["all"]], s["train"])
    recorded = _recorded_samples(workspace)
    for site, s in sites.items():
        train, tasks = s.pop("train"), s.pop("tasks")
        key = sha256_obj({"train": [[i.id, t] for i, t in zip(train, tasks)], "limit": fc.max_train_examples, "seed": fc.seed,
                          "balance": fc.balance, "max_upweight": fc.max_upweight})
        rec = recorded.get(site)
        by_train_id = {i.id: i for i in train}
        if rec and rec.get("key") == key and all(i in by_train_id for i in rec["ids"]):
            s["train"], s["balance"] = [by_train_id[i] for i in rec["ids"]], rec["balance"]  # the sample drawn before
        else:
            s["train"], s["balance"] = balanced_sample(train, tasks, fc.max_train_examples, fc.seed, fc.balance, fc.max_upweight)
        recorded[site] = {"key": key, "ids": [i.id for i in s["train"]], "balance": s["balance"]}
    write_json_atomic(workspace.stage_dir(STAGE) / SAMPLE_FILE, {k: recorded[k] for k in sorted(sites)})
    return sites


SAMPLE_FILE = "train_sample.json"


def _recorded_samples(workspace: Workspace) -> dict[str, Any]:
    """Per site, the training examples drawn by an earlier run (ids in training order) and what they were
    drawn from: while the site's train split and the sampling settings are unchanged, a re-run (after an
    interruption, on another machine, with another slmconvert version) trains on the very same examples."""
    path = workspace.stage_dir(STAGE) / SAMPLE_FILE
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        return {}  # a damaged record is redrawn, with the same seed


def balanced_sample(invs: list, tasks: list[str], limit: int | None, seed: int, balance: str = "sqrt",
                    max_upweight: float = 4.0) -> tuple[list, dict[str, Any]]:
    """A site's training examples and how they were drawn.

    `none`: a uniform sample of `limit` (all without a limit). `sqrt`: the tool-call and text-reply examples
    keep their traffic shares; within each, a task gets examples in proportion to the square root of its
    size (a frequent tool stops crowding out rare ones), never more than `max_upweight` times its traffic
    share; a task with too few examples for its share repeats them (each at most `max_upweight` times)."""
    from collections import defaultdict

    rng = random.Random(seed)
    n = min(limit, len(invs)) if limit else len(invs)
    if balance == "none" or not invs:
        picked = rng.sample(invs, n) if n < len(invs) else list(invs)
        return picked, {"method": "uniform", "examples": len(picked)}
    groups: dict[str, list] = defaultdict(list)
    for inv, t in zip(invs, tasks):
        groups[t].append(inv)
    total = len(invs)
    out: list = []
    per_task: dict[str, dict[str, Any]] = {}
    want: dict[str, int] = {}
    for kind in ("tool", "text"):
        names = sorted(t for t in groups if (t.startswith("tool") if kind == "tool" else not t.startswith("tool")))
        size = sum(len(groups[t]) for t in names)
        if not size:
            continue
        budget = round(n * size / total)
        root = {t: len(groups[t]) ** 0.5 for t in names}
        z = sum(root.values())
        for t in names:
            share = len(groups[t]) / size
            want[t] = min(round(budget * min(root[t] / z, max_upweight * share)), int(max_upweight * len(groups[t])))
    while sum(want.values()) > n:  # rounding must not break the cap: the largest task gives way
        want[max(want, key=lambda t: (want[t], t))] -= 1
    for t in want:
        pool = rng.sample(groups[t], len(groups[t]))
        take = [pool[i % len(pool)] for i in range(want[t])]
        out += take
        per_task[t] = {"available": len(pool), "examples": len(take), "traffic_share": round(len(pool) / total, 4),
                       "training_share": None}
    rng.shuffle(out)
    for t, d in per_task.items():
        d["training_share"] = round(d["examples"] / len(out), 4) if out else 0.0
    return out, {"method": "sqrt", "max_upweight": max_upweight, "examples": len(out), "tasks": per_task}


def run(config: PipelineConfig, workspace: Workspace, *, force: bool = False, progress: Progress = NULL_PROGRESS) -> Manifest:
    timer = Timer()
    fc = config.finetune
    with workspace.lock():
        cm = workspace.require_manifest("cluster", "finetune")
        sm = workspace.read_manifest("select")
        input_hash = sha256_obj({"cluster": cm.fingerprint(), "select": sm.fingerprint() if sm and not fc.models else None})
        config_hash = sha256_obj({"finetune": fc.model_dump(mode="json", exclude={"device", "checkpoint_steps"}),
                                  "compaction": config.compaction.model_dump(mode="json"), "version": TRAINING_VERSION})
        prev = workspace.previous(STAGE, force)
        adapters_intact = prev is not None and all((workspace.root / a["path"] / COMPLETE).exists()
                                                   for a in prev.extra.get("adapters", []))
        if workspace.unchanged(prev, config_hash, input_hash, force, adapters_intact):
            return prev
        todo = plan(config, workspace)
        with timer.step("load_s"):
            sites = site_data(config, workspace)
        if force:
            for site, models in todo.items():
                for m in models:
                    from slmconvert.models.loading import resolve_model

                    (adapter_dir(workspace, site, resolve_model(m).name) / COMPLETE).unlink(missing_ok=True)
        workspace.invalidate(STAGE)
        adapters, warnings_ = [], []
        with timer.step("train_s"):
            for site, models in todo.items():
                if not models:
                    warnings_.append(f"site {site}: no candidate model (see candidates.json); nothing trained")
                    continue
                if not sites.get(site, {}).get("train"):
                    warnings_.append(f"site {site}: no training examples in the train split; nothing trained")
                    continue
                for m in models:
                    a = train_one(workspace, config, site, m, sites[site]["train"], sites[site]["recipe"], progress,
                                  sites[site]["balance"])
                    adapters.append(a)
                    fitted = {k[7:]: v for k, v in a.get("data", {}).items() if k.startswith("fitted_") and v}
                    if fitted:
                        warnings_.append(f"site {site} ({a['model']}): prompts longer than finetune.max_length={config.finetune.max_length} "
                                         "were fitted, not dropped: " + ", ".join(f"{k.replace('_', ' ')} in {v}" for k, v in fitted.items()))
        if not adapters:
            raise StageError("finetune trained nothing: " + "; ".join(warnings_))
        counts = {"adapters": len(adapters), "trained": sum(a["status"] == "ran" for a in adapters),
                  "skipped": sum(a["status"] == "skipped" for a in adapters),
                  "resumed": sum(1 for a in adapters if a.get("resumed_from") and a["status"] == "ran"),
                  "examples": sum(a["examples"] for a in adapters)}
        manifest = Manifest(stage=STAGE, config_hash=config_hash, input_hash=input_hash,
                            inputs={"cluster": cm.fingerprint(), "select": sm.fingerprint() if sm else None},
                            counts=counts, timings=timer.total(),
                            files=[a["path"] for a in adapters], status="ran" if prev is None else "updated",
                            extra={"adapters": [{k: v for k, v in a.items() if k != "files"} for a in adapters],
                                   "recipes": {s: d["recipe"].to_dict() for s, d in sites.items()},
                                   "training_mix": {s: d["balance"] for s, d in sites.items()}, "train_sample": SAMPLE_FILE,
                                   "warnings": warnings_})
        workspace.write_manifest(manifest)
        return manifest
