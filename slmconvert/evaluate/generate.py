"""Step 1 of `evaluate`: which test calls, with which prompts, and the SLMs' answers to them.

The sample is in proportion to the traffic (each task's share of the site's test calls), with a floor
per task so rare tasks still show; every sampled call carries the weight (test calls it stands for)
that re-weights results to the real mix. Generations are cached in eval/generations.jsonl
(append-only, flushed per batch) keyed by (model, adapter fingerprint, prompt, settings): an
interrupted run resumes where it stopped, a re-run after new logs generates only for new calls.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from slmconvert.chat import fit_prompt, prompt_budget
from slmconvert.errors import ModelNotFound
from slmconvert.io import atomic_path, read_json, sha256_obj
from slmconvert.progress import Progress


# ----------------------------------------------------------------------------- test data


@dataclass
class Sampled:
    task: str
    inv: Any  # slmconvert.invocation.Invocation
    weight: float  # test calls of its (site, task) this sampled call stands for


def test_sample(by_task: dict[str, list], limit: int | None, seed: int, min_per_task: int = 3) -> list[Sampled]:
    """All test calls of a site (weight 1), or `limit` of them: each task gets its share of `limit` in
    proportion to its test calls (largest remainders), never fewer than `min_per_task` it has (when the
    floors alone exceed `limit`, one call per task in turn, largest tasks first); seeded."""
    rng = random.Random(seed)
    tasks = sorted(by_task, key=lambda t: (-len(by_task[t]), t))
    total = sum(len(v) for v in by_task.values())
    if limit is None or limit >= total:
        return [Sampled(t, inv, 1.0) for t in tasks for inv in rng.sample(by_task[t], len(by_task[t]))]
    floor = {t: min(min_per_task, len(by_task[t])) for t in tasks}
    if sum(floor.values()) > limit:  # the floors alone exceed the limit: hand them out one round at a time
        want, floor = floor, dict.fromkeys(tasks, 0)
        while sum(floor.values()) < limit:
            for t in tasks:
                if floor[t] < want[t] and sum(floor.values()) < limit:
                    floor[t] += 1
    rest = max(0, limit - sum(floor.values()))
    spare = {t: len(by_task[t]) - floor[t] for t in tasks}
    spare_total = sum(spare.values()) or 1
    quota = {t: rest * spare[t] / spare_total for t in tasks}
    take = {t: floor[t] + int(quota[t]) for t in tasks}
    left = limit - sum(take.values())
    for t in sorted(tasks, key=lambda t: -(quota[t] - int(quota[t]))):
        if left <= 0:
            break
        if take[t] < len(by_task[t]):
            take[t] += 1
            left -= 1
    out = []
    for t in tasks:
        n = min(take[t], len(by_task[t]))
        out += [Sampled(t, inv, len(by_task[t]) / n) for inv in rng.sample(by_task[t], n)] if n else []
    return out


def base_messages(inv, recipe) -> tuple[list[dict], list[dict] | None]:
    """What an untrained model needs: the full instructions and tools, and the same history window."""
    from slmconvert.compaction import compact, estimate_tokens

    sys_tokens = sum(estimate_tokens(m.get("content") or "") + 4 for m in inv.request.messages if m.get("role") == "system")
    full = replace(recipe, drop_system_prompt=False, drop_tools=False, max_history_tokens=recipe.max_history_tokens + sys_tokens)
    return compact(inv.request.messages, full), inv.request.tools


def tuned_messages(inv, recipe) -> tuple[list[dict], list[dict] | None]:
    from slmconvert.compaction import compact, compact_tools

    return compact(inv.request.messages, recipe), compact_tools(inv.request.tools, recipe)


# ----------------------------------------------------------------------------- generation cache


class GenerationCache:
    """Append-only JSONL of generations; a torn last line (a killed run) is ignored."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[str, dict[str, Any]] = {}
        if path.exists():
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    self.rows[row["key"]] = row

    def add(self, rows: list[dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
                self.rows[r["key"]] = r
            f.flush()
            os.fsync(f.fileno())

    def compact_to(self, keep: set[str]) -> None:
        """Rewrite with only the generations still in use (atomically)."""
        with atomic_path(self.path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for k, r in self.rows.items():
                if k in keep:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")


def generate_cached(model, tok, prompts: list[str], variant_key: str, cache: GenerationCache, ec, budget: int,
                    progress: Progress, grammars=None, constraints: list | None = None,
                    specs: list | None = None, whole_name: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """The generations for `prompts` (cached ones read back) and their cache keys; `constraints`: one compiled
    grammar (or None) per prompt, applied with `grammars` (slmconvert.constrained), built from `specs` (per prompt,
    the tools and schemas it was compiled from: part of that prompt's key, so a change of the decoding rules
    generates again only the answers whose grammar it changed); `whole_name`: a call's tool is chosen by its whole
    name's probability (slmconvert.generation.WholeNameChoice) among each prompt's `specs`."""
    from slmconvert.generation import generate

    keys = [sha256_obj({"v": variant_key, "p": p} if specs is None else {"v": variant_key, "p": p, "g": specs[i]})
            for i, p in enumerate(prompts)]
    missing = sorted({k: i for i, k in enumerate(keys) if k not in cache.rows}.values(), key=lambda i: len(prompts[i]))
    progress.advance(len(prompts) - len(missing))
    chunk = ec.batch_size * 4
    for start in range(0, len(missing), chunk):
        idx = missing[start:start + chunk]
        gens = generate(model, tok, [prompts[i] for i in idx], max_new_tokens=ec.max_new_tokens, batch_size=ec.batch_size,
                        max_prompt_tokens=budget, progress=progress, grammars=grammars,
                        constraints=[constraints[i] for i in idx] if constraints else None,
                        tool_names=[[n for n, _ in specs[i]] for i in idx] if whole_name and specs is not None else None)
        cache.add([{"key": keys[i], **g.as_dict(), "seconds": round(g.seconds, 4)} for i, g in zip(idx, gens)])
    return [cache.rows[k] for k in keys], keys


@dataclass
class Answers:
    """One (site, model, variant)'s generations on its sample, in sample order."""
    site: str
    model: str
    variant: str  # base | finetuned
    sample: list[Sampled]
    generations: list[dict[str, Any]]
    prompt_tokens: list[int]
    keys: list[str]
    specials: list[str]


def head_choices(head, gate, cache, site: str, sample: list[Sampled], specs: list[list[tuple[str, dict]]],
                 progress: Progress) -> list[str | None]:
    """Per sampled call, the tool the site's action head picks among those its grammar offers (None: no choice)."""
    from slmconvert.embeddings import embed_texts
    from slmconvert.policy import request_text

    if head is None or site not in head.sites or not sample:
        return [None] * len(sample)
    vecs, _ = embed_texts([request_text(s.inv.request.messages) for s in sample], gate, cache, progress,
                          f"embedding {site}'s test calls for the action head")
    return [name for name, _ in head.choose(site, vecs, [s.inv.request.messages for s in sample],
                                            [[n for n, _ in sp] for sp in specs])]


def generate_all(config, workspace, adapters, samples: dict[str, list[Sampled]], cache: GenerationCache, problems: list[str],
                 progress: Progress, bounds: dict[str, dict] | None = None, *, head=None, gate=None,
                 emb_cache=None) -> tuple[list[Answers], dict[str, int]]:
    """Answers of every (model, site) variant: the base model (when `evaluate.base`) and each adapter;
    and how many generations were new vs cached. `bounds`: per site, the argument bounds of its
    constrained grammar (slmconvert.constrained.argument_bounds). `head` (slmconvert.action_head.ActionHead,
    requests embedded by `gate`): a call's grammar offers only the tool the head picks (a text reply stays allowed)."""
    from slmconvert.chat import answer_text, render_prompt, special_tokens, supports_native_tools
    from slmconvert.compaction import CompactionRecipe
    from slmconvert.action_head import narrow_specs
    from slmconvert.constrained import GRAMMAR_FORMAT, bounded_specs, tool_grammars
    from slmconvert.generation import RepeatGuard, WholeNameChoice
    from slmconvert.finetune.stage import COMPLETE, load_artefact
    from slmconvert.finetune.trainer import pick_device
    from slmconvert.models.adapters import adapter_name, attach, load_full
    from slmconvert.models.loading import load_model, resolve_model

    ec = config.evaluate
    device = pick_device(ec.device)
    ft_budget = prompt_budget(config.finetune.max_length, ec.max_new_tokens, ec.max_prompt_tokens)
    out: list[Answers] = []
    by_model: dict[str, list[dict]] = defaultdict(list)
    for a in adapters:
        by_model[a.get("model_ref") or a["model"]].append(a)
    counts = {"new": 0, "cached": 0}
    bounds = bounds or {}
    budget_checked: set[str] = set()

    def check_budget(tok, site, sample) -> None:
        """Say so when the LLM's own answers do not fit the generation budget: those cannot be matched."""
        if site in budget_checked:
            return
        budget_checked.add(site)
        lengths = [(len(tok(answer_text(s.inv.response), add_special_tokens=False)["input_ids"]), s.inv) for s in sample]
        over = [(n, inv) for n, inv in lengths if n > ec.max_new_tokens]
        if over:
            tools = Counter(c.name for _, inv in over for c in inv.response.tool_calls[:1])
            problems.append(f"site {site}: {len(over)} of {len(sample)} sampled calls have an LLM answer longer than "
                            f"evaluate.max_new_tokens={ec.max_new_tokens} SLM tokens (longest {max(n for n, _ in over)}"
                            + (f"; {', '.join(f'{t} {k}' for t, k in tools.most_common(3))}" if tools else "")
                            + "): an SLM answer is cut off there and counts as broken; raise evaluate.max_new_tokens")

    def run_variant(model, tok, site, sample, make_messages, variant, variant_key, budget, model_name, grammars,
                    whole_name) -> None:
        native = supports_native_tools(tok)
        prompts, lengths = [], []
        check_budget(tok, site, sample)
        # the grammar follows the request's own tools, not the compacted prompt's (compaction may drop their docs)
        specs = ([bounded_specs(s.inv.request.tools, bounds.get(site), s.inv.request.messages) for s in sample]
                 if grammars is not None else None)
        if specs is not None and head is not None:
            picked = head_choices(head, gate, emb_cache, site, sample, specs, progress)
            specs = [narrow_specs(sp, name, head.known(site)) for sp, name in zip(specs, picked)]
        constraints = [grammars.for_specs(sp) for sp in specs] if specs is not None else None
        for s in sample:
            msgs, tools = make_messages(s.inv)
            fitted = fit_prompt(msgs, tools, tok, budget, native)
            if fitted is None:
                text = render_prompt(tok, msgs, tools, native)
                fitted = (text, min(budget, len(tok(text, add_special_tokens=False)["input_ids"])))
            prompts.append(fitted[0])
            lengths.append(fitted[1])
        before = len(cache.rows)
        gens, keys = generate_cached(model, tok, prompts, variant_key, cache, ec, budget, progress, grammars, constraints, specs,
                                     whole_name)
        counts["new"] += len(cache.rows) - before
        counts["cached"] += len(prompts) - (len(cache.rows) - before)
        out.append(Answers(site, model_name, variant, sample, gens, lengths, keys, special_tokens(tok)))

    for model_name, ads in by_model.items():
        entry = resolve_model(model_name)
        try:
            model, tok, info = load_model(entry, local_folder=config.select.local_models.get(entry.name), device=device,
                                          download_ok=config.select.download)
        except ModelNotFound as e:
            problems.append(f"{model_name}: {e}")
            continue
        grammars = tool_grammars(tok, getattr(model.config, "vocab_size", None), problems) if ec.constrained_decoding else None
        settings = {"max_new_tokens": ec.max_new_tokens, "model": entry.name, "location": info["location"], "dtype": info["dtype"],
                    "constrained": grammars is not None, "grammar": GRAMMAR_FORMAT if grammars is not None else None,
                    "logprobs": "raw-v1",
                    "guard": RepeatGuard.VERSION}
        whole_name = grammars is not None and ec.tool_choice == "whole_name"
        if whole_name:  # only then part of the key: the greedy answers cached before stay valid
            settings["choice"] = WholeNameChoice.VERSION
        todo = []
        for a in ads:
            sample = samples.get(a["site"]) or []
            if not sample:
                problems.append(f"site {a['site']}: no test examples (all its sessions are in the train split); nothing to evaluate")
                continue
            d = workspace.root / a["path"]
            todo.append((a, d, sample, CompactionRecipe.from_dict(read_json(d / "recipe.json")), read_json(d / COMPLETE)["fingerprint"]))
        if ec.base:  # the untrained model first, before any adapter is attached to it
            for a, d, sample, recipe, fp in todo:
                run_variant(model, tok, a["site"], sample, lambda inv, r=recipe: base_messages(inv, r), "base",
                            sha256_obj({**settings, "adapter": None, "budget": ec.max_prompt_tokens}),
                            ec.max_prompt_tokens, entry.name, grammars, whole_name)
        peft_model = None
        for a, d, sample, recipe, fp in todo:
            key = sha256_obj({**settings, "adapter": fp, "budget": ft_budget})
            kind, weights, _ = load_artefact(d)
            if kind == "adapter":  # several adapters share one base model in memory
                peft_model = tuned = attach(model, peft_model, weights, adapter_name(fp))
            else:  # full fine-tuning saved a whole model
                tuned = load_full(weights, device)
            run_variant(tuned, tok, a["site"], sample, lambda inv, r=recipe: tuned_messages(inv, r), "finetuned",
                        key, ft_budget, entry.name, grammars, whole_name)
            del tuned
        del model, peft_model
    return out, counts
