"""`evaluate`: does the SLM replace the LLM, task by task?

On the test split only (sessions never seen in training), per call site: generate with the base
SLM (full instructions, as it would be deployed untrained) and with each fine-tuned adapter (the
same compaction as training), greedy and batched; compare every answer with the LLM's logged
response using the metric registry; give each task a verdict on the site's best adapter; and
report the share of calls, tokens and cost that moves to SLMs.

Generations are cached in eval/generations.jsonl (append-only, flushed per batch) keyed by
(model, adapter fingerprint, prompt, settings): an interrupted run resumes where it stopped,
and a re-run after new logs generates only for new test calls.
"""

from __future__ import annotations

import json
import os
import random
import warnings
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

from slmconvert.chat import prompt_budget
from slmconvert.config import PipelineConfig
from slmconvert.errors import ModelNotFound, StageError
from slmconvert.io import atomic_path, read_json, sha256_obj, write_json_atomic, write_parquet_atomic
from slmconvert.progress import NULL_PROGRESS, Progress
from slmconvert.workspace import Manifest, Timer, Workspace

STAGE = "evaluate"
RESULTS = "results.parquet"
SUMMARY = "summary.json"
POLICY = "policy.json"  # what `serve` applies (slmconvert.policy)
REPORT = "report.html"
GENERATIONS = "generations.jsonl"
EVAL_VERSION = 2
ALL_METRICS = ["call_agreement", "function_name", "arguments", "argument_values", "exact_match", "valid_json",
               "chrf", "rouge_l"]


# ----------------------------------------------------------------------------- test data


def test_sample(by_task: dict[str, list], limit: int | None, seed: int) -> list[tuple[str, Any]]:
    """(task, invocation) pairs: all of them, or `limit` drawn round-robin over tasks (every task gets
    examples before any task gets more), seeded."""
    rng = random.Random(seed)
    tasks = sorted(by_task, key=lambda t: (-len(by_task[t]), t))
    pools = {t: rng.sample(by_task[t], len(by_task[t])) for t in tasks}
    out: list[tuple[str, Any]] = []
    while any(pools.values()) and (limit is None or len(out) < limit):
        for t in tasks:
            if pools[t] and (limit is None or len(out) < limit):
                out.append((t, pools[t].pop()))
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
                    progress: Progress) -> list[dict[str, Any]]:
    from slmconvert.generation import generate

    keys = [sha256_obj({"v": variant_key, "p": p}) for p in prompts]
    missing = sorted({k: i for i, k in enumerate(keys) if k not in cache.rows}.values(), key=lambda i: len(prompts[i]))
    progress.advance(len(prompts) - len(missing))
    chunk = ec.batch_size * 4
    for start in range(0, len(missing), chunk):
        idx = missing[start:start + chunk]
        gens = generate(model, tok, [prompts[i] for i in idx], max_new_tokens=ec.max_new_tokens, batch_size=ec.batch_size,
                        max_prompt_tokens=budget, progress=progress)
        cache.add([{"key": keys[i], "text": g.text, "new_tokens": g.new_tokens, "mean_logprob": g.mean_logprob,
                    "seconds": round(g.seconds, 4)} for i, g in zip(idx, gens)])
    return [cache.rows[k] for k in keys]


# ----------------------------------------------------------------------------- scoring


def score_rows(sample, gens, prompt_tokens, *, site, model, variant, specials, task_kind) -> list[dict[str, Any]]:
    from slmconvert.chat import answer_text, parse_completion
    from slmconvert.metrics import Prediction, score

    rows = []
    for (task, inv), g, pt in zip(sample, gens, prompt_tokens):
        resp, ok = parse_completion(g["text"], specials)
        s = score(inv.response, Prediction(resp, ok, g["text"]), inv.request.tools, ALL_METRICS)
        rows.append({"invocation_id": inv.id, "session": inv.session_id, "site": site, "task": task,
                     "kind": task_kind.get((site, task), "tool" if inv.response.tool_calls else "text"),
                     "model": model, "variant": variant, "prompt_tokens": pt, "new_tokens": g["new_tokens"],
                     "seconds": g["seconds"], "confidence": g["mean_logprob"],
                     "expected": answer_text(inv.response), "prediction": g["text"],
                     "response": resp, "predicted_call": bool(resp.tool_calls), "well_formed": ok, **s,
                     "embedding_similarity": None, "judge": None, "acceptable": False,
                     "prompt_turn": _turn(inv)})
    return rows


def _turn(inv) -> str:
    from slmconvert.cluster.features import prompting_turn

    return prompting_turn(inv.request.messages, 600)


def add_text_similarity(rows: list[dict[str, Any]], config: PipelineConfig, workspace: Workspace, progress: Progress) -> None:
    """Embedding cosine between the LLM's text reply and the SLM's (0 when the SLM called a tool instead)."""
    import numpy as np

    from slmconvert.embeddings import Embedder, EmbeddingCache, embed_texts

    text_rows = [r for r in rows if r["kind"] == "text" and not r["predicted_call"]]
    for r in rows:
        if r["kind"] == "text" and r["predicted_call"]:
            r["embedding_similarity"] = 0.0
    if not text_rows:
        return
    cc = config.cluster
    embedder = Embedder(cc.embedding_model, cc.batch_size, cc.device, 256)
    cache = EmbeddingCache(workspace.stage_dir(STAGE) / "cache", embedder.key)
    texts = [t for r in text_rows for t in (r["expected"], _reply_text(r["prediction"]))]
    vecs, _ = embed_texts(texts, embedder, cache, progress, "embedding replies")
    for k, r in enumerate(text_rows):
        r["embedding_similarity"] = round(float(np.clip(vecs[2 * k] @ vecs[2 * k + 1], -1.0, 1.0)), 4)


def _reply_text(prediction: str) -> str:
    return prediction.strip() or " "


def add_judge(rows: list[dict[str, Any]], jc, progress: Progress) -> dict[str, int]:
    from slmconvert.evaluate.judge import Judge

    judge = Judge(jc.url, jc.model, jc.api_key_env, jc.timeout_s)
    counts: dict[tuple, int] = defaultdict(int)
    todo = []
    for r in rows:
        if r["kind"] != "text" or r["predicted_call"]:
            continue
        key = (r["site"], r["model"], r["variant"])
        if counts[key] < jc.max_examples:
            counts[key] += 1
            todo.append(r)
    stats = {"judged": 0, "failed": 0}
    errors: list[str] = []
    if todo:
        progress.start("LLM-as-judge", total=len(todo))
    try:
        for r in todo:
            res = judge.grade(r["prompt_turn"], r["expected"], r["prediction"])
            r["judge"] = res.score
            if res.score is None:
                stats["failed"] += 1
                errors.append(res.error or "")
            else:
                stats["judged"] += 1
            progress.advance(1)
    finally:
        progress.stop()
    if errors:
        stats["first_error"] = errors[0]  # type: ignore[assignment]
    return stats


def mark_acceptable(rows: list[dict[str, Any]], ec) -> None:
    for r in rows:
        if r["kind"] == "tool":
            r["acceptable"] = bool(r["arguments"] == 1.0)
        elif r["predicted_call"]:
            r["acceptable"] = False
        elif r["judge"] is not None:
            r["acceptable"] = r["judge"] >= ec.judge.pass_at
        else:
            r["acceptable"] = (r["embedding_similarity"] or 0.0) >= ec.text_similarity_at


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def mean(vals):
        vals = [v for v in vals if v is not None]
        return round(sum(vals) / len(vals), 4) if vals else None

    out = {m: mean(r[m] for r in rows) for m in ALL_METRICS + ["embedding_similarity", "judge"]}
    out.update({"n": len(rows), "acceptable": mean(float(r["acceptable"]) for r in rows),
                "confidence": mean(r["confidence"] for r in rows),
                "seconds_per_call": mean(r["seconds"] for r in rows),
                "tokens_per_s": round(sum(r["new_tokens"] for r in rows) / max(sum(r["seconds"] for r in rows), 1e-9), 1) if rows else None})
    return out


# ----------------------------------------------------------------------------- the stage


def _config_hash(config: PipelineConfig) -> str:
    ec = config.evaluate.model_dump(mode="json", exclude={"batch_size", "device", "examples_in_report"})
    return sha256_obj({"evaluate": ec, "compaction": config.compaction.model_dump(mode="json"),
                       "finetune_max_length": config.finetune.max_length, "embedding": config.cluster.embedding_model,
                       "version": EVAL_VERSION})


def _adapter_problem(workspace: Workspace, a: dict[str, Any]) -> str | None:
    from slmconvert.finetune.stage import COMPLETE, load_artefact

    d = workspace.root / a["path"]
    if not (d / COMPLETE).exists():
        return f"adapter {a['path']} is missing or unfinished (no {COMPLETE}): re-run `slmconvert finetune`"
    if load_artefact(d) is None:
        return f"adapter {a['path']} has lost the weights its {COMPLETE} names: re-run `slmconvert finetune --force`"
    return None


def run(config: PipelineConfig, workspace: Workspace, *, force: bool = False, progress: Progress = NULL_PROGRESS) -> Manifest:
    from slmconvert.cluster.stage import load_assignments, load_tasks
    from slmconvert.store import load_invocations

    ec = config.evaluate
    timer = Timer()
    with workspace.lock():
        cm = workspace.require_manifest("cluster", "evaluate")
        fm = workspace.read_manifest("finetune")
        if fm is None:
            raise StageError("evaluate compares fine-tuned SLMs with the LLM, and this workspace has none yet: run "
                             f"`slmconvert finetune --workspace {workspace.root}` first")
        input_hash = sha256_obj({"cluster": cm.fingerprint(), "finetune": fm.fingerprint()})
        config_hash = _config_hash(config)
        prev = workspace.previous(STAGE, force)
        outputs_intact = prev is not None and all((workspace.stage_dir(STAGE) / f).exists() for f in prev.files)
        if workspace.unchanged(prev, config_hash, input_hash, force, outputs_intact):
            return prev

        with timer.step("load_s"):
            tasks_doc = load_tasks(workspace)
            in_stage, _ = workspace.input_manifest("evaluate")
            by_id = {i.id: i for i in load_invocations(workspace, in_stage)}
            test_by_site: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
            for a in load_assignments(workspace):
                inv = by_id.get(a["invocation_id"])
                if inv is not None and a["split"] == "test":
                    test_by_site[a["site"]][a["task"]].append(inv)
        task_kind = {(s, t["task"]): t["kind"] for s, sd in tasks_doc["sites"].items() for t in sd["tasks"]}
        samples = {s: test_sample(bt, ec.max_test_examples, ec.seed) for s, bt in test_by_site.items()}

        problems: list[str] = []
        adapters = []
        for a in fm.extra.get("adapters", []):
            why = _adapter_problem(workspace, a)
            (problems.append(why) if why else adapters.append(a))
        if not adapters:
            raise StageError("evaluate found no usable adapter: " + ("; ".join(problems) or "finetune trained none")
                             + f". Run `slmconvert finetune --workspace {workspace.root}`")

        stage_dir = workspace.stage_dir(STAGE)
        stage_dir.mkdir(parents=True, exist_ok=True)
        workspace.invalidate(STAGE)
        cache = GenerationCache(stage_dir / GENERATIONS)
        rows: list[dict[str, Any]] = []
        with timer.step("generate_s"):
            total = sum(len(samples.get(a["site"], [])) * (2 if ec.base else 1) for a in adapters)
            progress.start("evaluating on the test split", total=total)
            try:
                rows, gen_counts = _generate_all(config, workspace, adapters, samples, cache, task_kind, problems, progress)
            finally:
                progress.stop()
        used_keys = {r.pop("_key") for r in rows}
        with timer.step("score_s"):
            add_text_similarity(rows, config, workspace, progress)
            judge_stats = add_judge(rows, ec.judge, progress) if ec.judge else None
            if judge_stats and judge_stats["failed"]:
                problems.append(f"LLM-as-judge failed on {judge_stats['failed']} of {judge_stats['failed'] + judge_stats['judged']} "
                                f"replies ({judge_stats.get('first_error')}); those fall back to embedding similarity")
            mark_acceptable(rows, ec)
        summary, policy = summarise(config, tasks_doc, rows, adapters, problems, judge_stats, by_id)
        summary["generation"] = gen_counts
        summary["timings"] = timer.total()

        with timer.step("write_s"):
            _write_results(stage_dir / RESULTS, rows)
            write_json_atomic(stage_dir / POLICY, policy)
            write_json_atomic(stage_dir / SUMMARY, summary)
            from slmconvert.evaluate.report import write_report

            write_report(stage_dir / REPORT, summary, rows, ec.examples_in_report)
            cache.compact_to(used_keys)
        h = summary["headline"]
        counts = {"test_examples": len({r["invocation_id"] for r in rows}), "rows": len(rows), "adapters": len(adapters),
                  "tasks": len(summary["tasks"]), **{f"verdict_{k.replace('-', '_')}": v for k, v in h["verdicts"].items()},
                  "generated_new": summary["generation"]["new"], "generated_cached": summary["generation"]["cached"]}
        manifest = Manifest(stage=STAGE, config_hash=config_hash, input_hash=input_hash,
                            inputs={"cluster": cm.fingerprint(), "finetune": fm.fingerprint()}, counts=counts,
                            timings=timer.total(), files=[RESULTS, SUMMARY, POLICY, REPORT], status="ran" if prev is None else "updated",
                            extra={"headline": h, "problems": problems,
                                   "verdicts": {f"{t['site']}/{t['task']}": t["verdict"] for t in summary["tasks"]}})
        workspace.write_manifest(manifest)
        return manifest


def _generate_all(config, workspace, adapters, samples, cache, task_kind, problems,
                  progress) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Generations of every (model, site) variant, scored; and how many were new vs cached."""
    from slmconvert.chat import supports_native_tools
    from slmconvert.compaction import CompactionRecipe
    from slmconvert.finetune.data import fit_prompt
    from slmconvert.finetune.stage import COMPLETE, load_artefact
    from slmconvert.finetune.trainer import pick_device
    from slmconvert.models.loading import load_model, resolve_model

    ec = config.evaluate
    device = pick_device(ec.device)
    ft_budget = prompt_budget(config.finetune.max_length, ec.max_new_tokens, ec.max_prompt_tokens)
    rows: list[dict[str, Any]] = []
    by_model: dict[str, list[dict]] = defaultdict(list)
    for a in adapters:
        by_model[a.get("model_ref") or a["model"]].append(a)
    gen_counts = {"new": 0, "cached": 0}

    def run_variant(model, tok, site, sample, make_messages, variant, variant_key, budget, model_name):
        native = supports_native_tools(tok)
        prompts, lengths = [], []
        for _, inv in sample:
            msgs, tools = make_messages(inv)
            fitted = fit_prompt(msgs, tools, tok, budget, native)
            if fitted is None:
                from slmconvert.chat import render_prompt

                text = render_prompt(tok, msgs, tools, native)
                fitted = (text, min(budget, len(tok(text, add_special_tokens=False)["input_ids"])))
            prompts.append(fitted[0])
            lengths.append(fitted[1])
        before = len(cache.rows)
        gens = generate_cached(model, tok, prompts, variant_key, cache, ec, budget, progress)
        gen_counts["new"] += len(cache.rows) - before
        gen_counts["cached"] += len(prompts) - (len(cache.rows) - before)
        specials = [t for t in (tok.eos_token, tok.pad_token, tok.bos_token) if t]
        out = score_rows(sample, gens, lengths, site=site, model=model_name, variant=variant, specials=specials,
                         task_kind=task_kind)
        for r, p in zip(out, prompts):
            r["_key"] = sha256_obj({"v": variant_key, "p": p})
        return out

    for model_name, ads in by_model.items():
        entry = resolve_model(model_name)
        try:
            model, tok, info = load_model(entry, local_folder=config.select.local_models.get(entry.name), device=device,
                                          download_ok=config.select.download)
        except ModelNotFound as e:
            problems.append(f"{model_name}: {e}")
            continue
        settings = {"max_new_tokens": ec.max_new_tokens, "model": entry.name, "location": info["location"], "dtype": info["dtype"]}
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
                rows += run_variant(model, tok, a["site"], sample, lambda inv, r=recipe: base_messages(inv, r), "base",
                                    sha256_obj({**settings, "adapter": None, "budget": ec.max_prompt_tokens}),
                                    ec.max_prompt_tokens, entry.name)
        peft_model = None
        for a, d, sample, recipe, fp in todo:
            key = sha256_obj({**settings, "adapter": fp, "budget": ft_budget})
            kind, weights, _ = load_artefact(d)
            if kind == "adapter":  # several adapters share one base model in memory
                from peft import PeftModel

                name = f"a{fp[:12]}"
                with warnings.catch_warnings():  # peft asks transformers 5 for a renamed attribute
                    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                    if peft_model is None:
                        peft_model = PeftModel.from_pretrained(model, str(weights), adapter_name=name)
                    else:
                        peft_model.load_adapter(str(weights), adapter_name=name)
                peft_model.set_adapter(name)
                peft_model.eval()
                tuned = peft_model
            else:  # full fine-tuning saved a whole model
                from transformers import AutoModelForCausalLM

                tuned = AutoModelForCausalLM.from_pretrained(weights, local_files_only=True).to(device).eval()
            rows += run_variant(tuned, tok, a["site"], sample, lambda inv, r=recipe: tuned_messages(inv, r), "finetuned",
                                key, ft_budget, entry.name)
            del tuned
        del model, peft_model
    return rows, gen_counts


def summarise(config, tasks_doc, rows, adapters, problems, judge_stats, by_id) -> tuple[dict[str, Any], dict[str, Any]]:
    """summary.json, and the routing policy serve applies (policy.json)."""
    from slmconvert.evaluate.prices import load_prices
    from slmconvert.evaluate.verdicts import decide, share_moved

    ec = config.evaluate
    prices = load_prices(ec.prices)
    groups: dict[tuple, list] = defaultdict(list)
    for r in rows:
        groups[(r["site"], r["model"], r["variant"], r["task"])].append(r)
    site_models: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["variant"] == "finetuned":
            site_models[r["site"]][r["model"]].append(r)
    chosen = {}
    for site, models in site_models.items():
        # the site's adapter: most acceptable answers, then the smaller model
        chosen[site] = max(models, key=lambda m: (sum(r["acceptable"] for r in models[m]) / len(models[m]), -len(m)))

    tasks_out = []
    for site, sd in tasks_doc["sites"].items():
        llm_model = ec.llm_model or (sd.get("models") or [None])[0]
        for t in sd["tasks"]:
            task = t["task"]
            m = chosen.get(site)
            tuned = groups.get((site, m, "finetuned", task), []) if m else []
            if m is None:
                from slmconvert.evaluate.verdicts import Verdict

                v = Verdict("keep-llm", "no evaluated adapter for this call site", None, 0)
            else:
                v = decide([r["acceptable"] for r in tuned], [r["confidence"] for r in tuned], replace_at=ec.replace_at,
                           hybrid_min_coverage=ec.hybrid_min_coverage, min_test_examples=ec.min_test_examples)
            cost = t.get("cost_usd")
            cost_source = "logged" if cost is not None else None
            if cost is None:
                cost = prices.cost(llm_model, t["prompt_tokens"], t["completion_tokens"])
                cost_source = f"priced as {prices.lookup(llm_model).name}" if cost is not None else None
            per_model = {}
            for (s2, mname, variant, t2), rs in groups.items():
                if s2 == site and t2 == task:
                    per_model[f"{mname}/{variant}"] = aggregate(rs)
            entry = {"site": site, "task": task, "label": t["label"], "kind": t["kind"], "size": t["size"],
                     "share_calls": t["share_calls"], "prompt_tokens": t["prompt_tokens"],
                     "completion_tokens": t["completion_tokens"], "test_examples": t.get("test", 0),
                     "evaluated": len(tuned), "model": m, "llm_model": llm_model,
                     "llm_cost_usd": round(cost, 6) if cost is not None else None, "cost_source": cost_source,
                     "base": per_model.get(f"{m}/base") if m else None,
                     "finetuned": per_model.get(f"{m}/finetuned") if m else None,
                     "all_models": per_model, **v.to_dict()}
            tasks_out.append(entry)
    headline = share_moved(tasks_out)
    headline["paper_estimate"] = "40-70% of calls (Belcak et al., 2025, §5)"
    policy_doc, policy_check = fit_routing_policy(config, tasks_doc, rows, chosen, by_id)
    headline["policy"] = policy_check["verification"]["all"]

    # speed and cost of the SLM side
    speed = {}
    for site, m in chosen.items():
        tuned = [r for r in rows if r["site"] == site and r["model"] == m and r["variant"] == "finetuned"]
        agg = aggregate(tuned)
        speed[site] = {"model": m, "seconds_per_call": agg["seconds_per_call"], "tokens_per_s": agg["tokens_per_s"]}
    lat = [by_id[r["invocation_id"]].latency_ms for r in rows if r["variant"] == "finetuned"
           and by_id.get(r["invocation_id"]) is not None and by_id[r["invocation_id"]].latency_ms is not None]
    llm_latency = round(sum(lat) / len(lat) / 1000.0, 3) if lat else None
    sec = [s["seconds_per_call"] for s in speed.values() if s["seconds_per_call"] is not None]
    slm_s = sum(sec) / len(sec) if sec else None
    slm_cost = (headline["calls_moved"] * slm_s * ec.slm_hour_usd / 3600.0) if slm_s is not None else None
    cost = {"llm_cost_moved_usd": headline["llm_cost_moved_usd"], "llm_cost_total_usd": headline["llm_cost_total_usd"],
            "slm_cost_moved_usd": round(slm_cost, 4) if slm_cost is not None else None,
            "slm_hour_usd": ec.slm_hour_usd, "prices_as_of": prices.as_of,
            "net_saving_usd": round(headline["llm_cost_moved_usd"] - slm_cost, 4)
            if headline["llm_cost_moved_usd"] is not None and slm_cost is not None else None,
            "tokens_estimated": tasks_doc.get("totals", {}).get("tokens_estimated")}
    overall: dict[str, Any] = {}
    for variant in ("base", "finetuned"):
        for kind in ("tool", "text"):
            rs = [r for r in rows if r["variant"] == variant and r["kind"] == kind and chosen.get(r["site"]) == r["model"]]
            if rs:
                overall[f"{variant}_{kind}"] = aggregate(rs)
    per_argument: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["variant"] == "finetuned" and r["kind"] == "tool" and chosen.get(r["site"]) == r["model"]:
            _per_argument(r, by_id, per_argument)
    return {
        "version": EVAL_VERSION, "headline": headline, "cost": cost,
        "speed": {"slm": speed, "llm_seconds_per_call": llm_latency,
                  "note": "SLM seconds per call are batched wall time / batch size on this machine"},
        "overall": overall, "chosen_adapters": chosen,
        "per_argument": {k: {a: round(sum(v) / len(v), 4) for a, v in d.items()} for k, d in per_argument.items()},
        "tasks": tasks_out, "problems": problems, "judge": judge_stats,
        "policy": {**policy_check, "rules": policy_doc["rules"], "target_agreement": policy_doc["target_agreement"],
                   "confidence_level": policy_doc["confidence_level"]},
        "thresholds": {"replace_at": ec.replace_at, "hybrid_min_coverage": ec.hybrid_min_coverage,
                       "min_test_examples": ec.min_test_examples, "text_similarity_at": ec.text_similarity_at,
                       "judge_pass_at": ec.judge.pass_at if ec.judge else None},
        "adapters": [{k: a.get(k) for k in ("site", "model", "path", "method", "artefact", "examples", "train_loss")}
                     for a in adapters],
    }, policy_doc


def fit_routing_policy(config, tasks_doc, rows, chosen, by_id) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit the routing policy `serve` applies on the calibration half of the test sessions and measure it
    on the verification half (`slmconvert.policy`)."""
    from slmconvert.policy import Policy, answer_key, fit_policy, invalid_reason, split_sessions, verify

    ec = config.evaluate
    site_tasks = {site: [t["task"] for t in sd["tasks"]] for site, sd in tasks_doc["sites"].items()}
    sizes = {(site, t["task"]): t["size"] for site, sd in tasks_doc["sites"].items() for t in sd["tasks"]}
    prows = []
    for r in rows:
        if r["variant"] != "finetuned" or chosen.get(r["site"]) != r["model"]:
            continue
        inv = by_id.get(r["invocation_id"])
        messages = inv.request.messages if inv is not None else []
        tools = inv.request.tools if inv is not None else None
        prows.append({"site": r["site"], "task": r["task"], "session": r["session"], "confidence": r["confidence"],
                      "agrees": r["acceptable"], "key": answer_key(r["response"], site_tasks.get(r["site"], []), messages),
                      "invalid": invalid_reason(r["response"], tools, r["well_formed"])})
    cal, ver = split_sessions((r["session"] for r in prows), ec.seed)
    doc = fit_policy(prows, cal, target=ec.target_agreement, level=ec.confidence_level, seed=ec.seed, sites=site_tasks)
    evaluated: dict[tuple[str, str], int] = defaultdict(int)
    for r in prows:
        evaluated[(r["site"], r["task"])] += 1
    weight = {k: sizes.get(k, n) / n for k, n in evaluated.items()}
    check = {"split": {"calibration_sessions": len(cal), "verification_sessions": len(ver),
                       "calibration_calls": sum(r["session"] in cal for r in prows),
                       "verification_calls": sum(r["session"] in ver for r in prows)},
             "verification": verify(Policy(doc), prows, ver, ec.confidence_level, weight),
             "confusion": _confusion(prows)}
    return doc, check


def _confusion(prows) -> dict[str, dict[str, int]]:
    """LLM's task x SLM's answer key, over all evaluated test calls of the chosen adapters."""
    out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in prows:
        out[f"{r['site']}/{r['task']}"][r["key"] or "(unknown)"] += 1
    return {k: dict(v) for k, v in sorted(out.items())}


def _per_argument(r: dict[str, Any], by_id, acc) -> None:
    from slmconvert.metrics import argument_outcomes

    inv = by_id.get(r["invocation_id"])
    if inv is None:
        return
    outcomes, _ = argument_outcomes(inv.response, r["response"], inv.request.tools)
    for tool, arg, ok in outcomes:
        acc[tool][arg].append(float(ok))


def _write_results(path: Path, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa

    cols = ["invocation_id", "session", "site", "task", "kind", "model", "variant", "prompt_tokens", "new_tokens",
            "seconds", "confidence", "acceptable", *ALL_METRICS, "embedding_similarity", "judge", "predicted_call",
            "well_formed", "expected", "prediction"]
    table = pa.table({c: [r.get(c) for r in rows] for c in cols}) if rows else pa.table({c: pa.array([], pa.string()) for c in cols})
    write_parquet_atomic(path, table)


def load_summary(workspace: Workspace) -> dict[str, Any]:
    workspace.require_manifest(STAGE, "this command")
    return read_json(workspace.stage_dir(STAGE) / SUMMARY)
