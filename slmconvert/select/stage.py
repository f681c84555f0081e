"""`select`: candidate SLMs per call site (paper step S4).

For every call site: filter the catalogue by licence, memory, context (the site's p95 prompt
length after compaction, plus the answer budget) and, optionally, native tool calling; then
probe the models that can be loaded here — zero-shot and few-shot on a small sample of each of
the site's tasks from the train split — scored with the metrics `evaluate` uses. Every model
not ranked is listed with the reason: excluded by a constraint, not available, or not probed.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from typing import Any

from slmconvert.chat import fit_prompt, prompt_budget
from slmconvert.config import PipelineConfig
from slmconvert.errors import ModelNotFound, StageError
from slmconvert.invocation import Invocation
from slmconvert.io import sha256_obj, write_json_atomic
from slmconvert.progress import NULL_PROGRESS, Progress
from slmconvert.workspace import Manifest, Timer, Workspace

STAGE = "select"
CANDIDATES = "candidates.json"
PROBE_METRICS = ["call_agreement", "function_name", "arguments", "valid_json", "chrf"]


def _p95(values: list[int]) -> int:
    if not values:
        return 0
    v = sorted(values)
    return v[min(len(v) - 1, int(round(0.95 * (len(v) - 1))))]


def site_profiles(invocations: list[Invocation], assignments: list[dict], config: PipelineConfig) -> dict[str, dict[str, Any]]:
    """Per site: its invocations by split/task, compaction recipe, p95 compacted prompt tokens, tool need."""
    from slmconvert.compaction import compact, compact_tools, estimate_tokens, fit_site_recipe

    by_id = {i.id: i for i in invocations}
    sites: dict[str, dict[str, Any]] = {}
    for a in assignments:
        inv = by_id.get(a["invocation_id"])
        if inv is None:
            continue
        s = sites.setdefault(a["site"], {"invocations": [], "tasks": defaultdict(list), "train_by_task": defaultdict(list)})
        s["invocations"].append(inv)
        s["tasks"][a["task"]].append(inv)
        if a["split"] == "train":
            s["train_by_task"][a["task"]].append(inv)
    cc = config.compaction
    for s in sites.values():
        prompts = [i.request.messages for i in s["invocations"]]
        train = [i for t in s["train_by_task"].values() for i in t]
        recipe = fit_site_recipe(cc, prompts, [i.request.tools for i in s["invocations"]], train)
        lengths = []
        for inv in s["invocations"]:
            msgs = compact(inv.request.messages, recipe)
            tools = compact_tools(inv.request.tools, recipe) or []
            lengths.append(sum(estimate_tokens(m.get("content") or "") + 4 for m in msgs)
                           + estimate_tokens(str(tools)))
        s["recipe"] = recipe
        s["p95_prompt_tokens"] = _p95(lengths)
        s["p95_completion_tokens"] = _p95([estimate_tokens((i.response.content or "") + str([c.arguments for c in i.response.tool_calls]))
                                           for i in s["invocations"]])
        s["needs_tools"] = any(i.response.tool_calls for i in s["invocations"])
    return sites


def constraint_problems(entry, site: dict[str, Any], sc) -> list[str]:
    problems = []
    if entry.licence not in sc.licences:
        problems.append(f"licence {entry.licence} is not in select.licences")
    need = entry.memory(sc.precision) * sc.training_overhead
    if need > sc.memory_budget_gb:
        problems.append(f"needs ~{need:.1f} GB to train at {sc.precision} (weights x {sc.training_overhead:g}) > budget {sc.memory_budget_gb:g} GB")
    wanted = site["p95_prompt_tokens"] + sc.max_new_tokens
    if entry.context_length is not None and entry.context_length < wanted:
        problems.append(f"context {entry.context_length:,} < site p95 prompt + answer ({wanted:,} tokens)")
    if sc.require_native_tools and site["needs_tools"] and entry.tool_calling is not True:
        problems.append("no native tool calling in its chat template (select.require_native_tools)")
    return problems


def probe_sample(site: dict[str, Any], sc) -> tuple[list[tuple[str, Invocation]], list[Invocation]]:
    """(task, invocation) probe examples from the train split, and few-shot examples (others)."""
    rng = random.Random(sc.seed)
    tasks = sorted(site["train_by_task"], key=lambda t: -len(site["train_by_task"][t]))
    pools = {t: rng.sample(site["train_by_task"][t], len(site["train_by_task"][t])) for t in tasks}
    sample: list[tuple[str, Invocation]] = []
    # Round-robin over tasks, largest first: every task is probed before any task twice.
    while len(sample) < sc.probe_max_examples and any(pools.values()):
        for task in tasks:
            if pools[task] and len(sample) < sc.probe_max_examples:
                sample.append((task, pools[task].pop()))
    used = {inv.id for _, inv in sample}
    shots = []
    for task in tasks:  # one shot per task, largest tasks first
        pool = [i for i in site["train_by_task"][task] if i.id not in used]
        if pool and len(shots) < sc.probe_shots:
            shots.append(rng.choice(pool))
    return sample, shots


def _shot_text(inv: Invocation) -> str:
    from slmconvert.chat import answer_text
    from slmconvert.cluster.features import prompting_turn

    return f"Turn:\n{prompting_turn(inv.request.messages, 400)}\nAnswer:\n{answer_text(inv.response)}"


def probe_messages(inv: Invocation, recipe, shots: list[Invocation]) -> list[dict]:
    """The probe sees the full instructions (an untrained model needs them), a windowed history, and optional shots."""
    from dataclasses import replace

    from slmconvert.compaction import compact

    msgs = compact(inv.request.messages, replace(recipe, drop_system_prompt=False, system_prefix=None, system_suffix=None))
    if not shots:
        return msgs
    block = "Examples of correct answers:\n\n" + "\n\n".join(f"### Example {k + 1}\n{_shot_text(s)}" for k, s in enumerate(shots))
    if msgs and msgs[0].get("role") == "system":
        return [{**msgs[0], "content": (msgs[0].get("content") or "") + "\n\n" + block}] + msgs[1:]
    return [{"role": "system", "content": block}] + msgs


def probe_model(model, tok, site: dict[str, Any], sc, progress: Progress, *, prompt_budget: int | None = None,
                deadline: float | None = None) -> dict[str, Any]:
    """Zero-shot (and few-shot) scores on the site's probe sample. Prompts are fitted like evaluate fits them;
    generation stops at `deadline` (time.monotonic) after at least one batch, and the result says what was left."""
    from slmconvert.chat import parse_completion, render_prompt, special_tokens, supports_native_tools
    from slmconvert.generation import generate
    from slmconvert.metrics import Prediction, headline, score

    sample, shots = probe_sample(site, sc)
    native = supports_native_tools(tok)
    budget = prompt_budget or sc.max_prompt_tokens
    result: dict[str, Any] = {"examples": len(sample), "tool_format": "native" if native else "fallback"}
    modes = [("zero_shot", [])] + ([("few_shot", shots)] if shots else [])
    specials = special_tokens(tok)
    not_probed = 0
    for mode, mode_shots in modes:
        items = []
        for task, inv in sample:
            msgs = probe_messages(inv, site["recipe"], mode_shots)
            fitted = fit_prompt(msgs, inv.request.tools, tok, budget, native)
            # a prompt even fitting cannot bring under the budget (huge tool schemas) is cut from the left by generate
            items.append((task, inv, fitted[0] if fitted else render_prompt(tok, msgs, inv.request.tools, native)))
        gens = []
        for start in range(0, len(items), sc.batch_size):
            if gens and deadline is not None and time.monotonic() > deadline:
                not_probed += len(items) - start
                progress.advance(len(items) - start)
                break
            gens += generate(model, tok, [p for _, _, p in items[start:start + sc.batch_size]], max_new_tokens=sc.max_new_tokens,
                             batch_size=sc.batch_size, max_prompt_tokens=budget, progress=progress)
        per_metric: dict[str, list[float]] = defaultdict(list)
        heads, per_task = [], defaultdict(list)
        for (task, inv, _), g in zip(items, gens):
            resp, ok = parse_completion(g.text, specials)
            s = score(inv.response, Prediction(resp, ok, g.text), inv.request.tools, PROBE_METRICS)
            for k, v in s.items():
                if v is not None:
                    per_metric[k].append(v)
            h = headline(s)
            heads.append(h)
            per_task[task].append(h)
        result[mode] = {
            "score": round(sum(heads) / len(heads), 4) if heads else 0.0,
            "examples": len(heads),
            "metrics": {k: round(sum(v) / len(v), 4) for k, v in per_metric.items()},
            "per_task": {t: round(sum(v) / len(v), 4) for t, v in per_task.items()},
            "tokens_per_s": round(sum(g.new_tokens for g in gens) / max(sum(g.seconds for g in gens), 1e-9), 1),
        }
    result["score"] = max(result[m]["score"] for m, _ in modes)
    if not_probed:
        result["not_probed"] = not_probed
        result["note"] = (f"{not_probed} probe answer(s) not generated: over the time budget "
                          f"(select.probe_time_budget_s={sc.probe_time_budget_s:g})")
    return result


def catalogue_ranking(eligible: list, site: dict[str, Any]) -> list[dict[str, Any]]:
    """Without a probe: the smallest eligible models, native tool calling first where the site calls tools."""
    order = sorted(eligible, key=lambda e: (site["needs_tools"] and not e.tool_calling, e.params_b, e.name))
    return [{"model": e.name, "score": None, "params_b": e.params_b, "licence": e.licence, "tool_calling": e.tool_calling,
             "rank": i + 1, "probe": None, "ranked_by": "catalogue"} for i, e in enumerate(order)]


def _probe_calls(site: dict[str, Any], sc) -> int:
    """Generations one model's probe of a site costs (zero-shot, plus few-shot when shots are on)."""
    return min(sc.probe_max_examples, sum(len(v) for v in site["train_by_task"].values())) * (2 if sc.probe_shots else 1)


def unavailable_reason(e: BaseException) -> str:
    """One line on why a candidate could not be loaded (offline, gated, missing, out of memory...)."""
    if isinstance(e, ModelNotFound):
        return f"unavailable: {e.hint}"
    text = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    if isinstance(e, MemoryError) or "out of memory" in text.lower():
        return f"unavailable: out of memory while loading ({text or type(e).__name__})"
    return f"unavailable: loading failed ({type(e).__name__}: {text})" if text else f"unavailable: loading failed ({type(e).__name__})"


def _config_hash(config: PipelineConfig, catalogue) -> str:
    sc = config.select.model_dump(mode="json", exclude={"batch_size"})
    return sha256_obj({"select": sc, "compaction": config.compaction.model_dump(mode="json"),
                       "catalogue": catalogue.model_dump(mode="json")})


def run(config: PipelineConfig, workspace: Workspace, *, force: bool = False, progress: Progress = NULL_PROGRESS) -> Manifest:
    from slmconvert.cluster.stage import load_assignments
    from slmconvert.models.catalogue import load_catalogue
    from slmconvert.models.loading import availability, load_model
    from slmconvert.store import load_invocations

    sc = config.select
    catalogue = load_catalogue(sc.catalogue)
    entries = [catalogue.get(n) for n in sc.models] if sc.models else list(catalogue.models)
    for name in sc.local_models:
        catalogue.get(name)  # an unknown name is an error, not a silent no-op
    timer = Timer()
    config_hash = _config_hash(config, catalogue)
    with workspace.lock():
        cm = workspace.require_manifest("cluster", "select")
        input_hash = cm.fingerprint()
        prev = workspace.previous(STAGE, force)
        # Availability is part of the input: a model installed since the last run changes the outcome.
        avail = {e.name: availability(e, sc.local_models.get(e.name), sc.download) for e in entries}
        avail_key = sha256_obj({n: [a.available, a.source] for n, a in avail.items()})
        if workspace.unchanged(prev, config_hash, input_hash, force, prev is not None and prev.extra.get("availability") == avail_key):
            return prev
        with timer.step("load_s"):
            in_stage, _ = workspace.input_manifest("select")
            invocations = load_invocations(workspace, in_stage)
            sites = site_profiles(invocations, load_assignments(workspace), config)
        if not sites:
            raise StageError("select: the cluster stage assigned no invocations to call sites; re-run `slmconvert cluster`")

        report: dict[str, dict[str, Any]] = {}
        to_probe: dict[str, list[str]] = defaultdict(list)  # model -> sites
        for name, site in sites.items():
            r = report[name] = {"site": name, "invocations": len(site["invocations"]), "tasks": len(site["tasks"]),
                                "needs_tools": site["needs_tools"], "p95_prompt_tokens": site["p95_prompt_tokens"],
                                "compaction": site["recipe"].to_dict(), "ranked": [], "excluded": [], "unavailable": [],
                                "not_probed": []}
            eligible = []
            for e in entries:
                problems = constraint_problems(e, site, sc)
                if problems:
                    r["excluded"].append({"model": e.name, "reason": "; ".join(problems)})
                elif not avail[e.name].available:
                    r["unavailable"].append({"model": e.name, "reason": avail[e.name].reason})
                else:
                    eligible.append(e)
            eligible.sort(key=lambda e: (e.params_b, e.name))
            if not sc.probe:
                r["ranked"] = catalogue_ranking(eligible, site)
                r["ranked_by"] = ("catalogue: select.probe is false, so no model was run; the smallest eligible models "
                                  "come first (native tool calling first where the site calls tools); no quality estimate")
                continue
            for e in eligible[: sc.probe_max_models]:
                to_probe[e.name].append(name)
            r["not_probed"] += [{"model": e.name, "reason": f"beyond select.probe_max_models ({sc.probe_max_models}, smallest first)"}
                                for e in eligible[sc.probe_max_models:]]

        probes: dict[tuple[str, str], dict[str, Any]] = {}
        deadline = time.monotonic() + sc.probe_time_budget_s
        pairs_left = sum(len(v) for v in to_probe.values())
        budget = prompt_budget(config.finetune.max_length, sc.max_new_tokens, sc.max_prompt_tokens)
        with timer.step("probe_s"):
            total = sum(_probe_calls(sites[s], sc) for m in to_probe for s in to_probe[m])
            if to_probe:
                progress.start("probing candidate SLMs", total=total)
            try:
                for model_name, site_names in to_probe.items():
                    entry = catalogue.get(model_name)
                    if avail[model_name].source == "hub":  # the size was found by the hub check
                        progress.describe(f"downloading {model_name}: {avail[model_name].reason}")
                    try:
                        model, tok, info = load_model(entry, local_folder=sc.local_models.get(model_name), download_ok=sc.download)
                    except Exception as e:  # noqa: BLE001 - a candidate that cannot load never fails the run
                        why = unavailable_reason(e)
                        for site_name in site_names:
                            report[site_name]["unavailable"].append({"model": model_name, "reason": why})
                        progress.advance(sum(_probe_calls(sites[s], sc) for s in site_names))
                        pairs_left -= len(site_names)
                        continue
                    progress.describe("probing candidate SLMs")
                    for site_name in site_names:
                        site = sites[site_name]
                        if not any(site["train_by_task"].values()):
                            report[site_name]["not_probed"].append({"model": model_name, "reason": "the site has no training examples"})
                            continue
                        share = max(deadline - time.monotonic(), 0.0) / max(pairs_left, 1)
                        pairs_left -= 1
                        probes[(site_name, model_name)] = {**probe_model(model, tok, site, sc, progress, prompt_budget=budget,
                                                                         deadline=time.monotonic() + share),
                                                           "source": info["source"]}
                    del model
            finally:
                progress.stop()

        for name, r in report.items():
            if not sc.probe:
                r["candidates"] = [c["model"] for c in r["ranked"][: sc.top_k]]
                if not r["ranked"]:
                    r["warning"] = "no model is eligible and available for this site: see unavailable/excluded"
                continue
            ranked = []
            for (site_name, model_name), p in probes.items():
                if site_name == name:
                    e = catalogue.get(model_name)
                    ranked.append({"model": model_name, "score": p["score"], "params_b": e.params_b, "licence": e.licence,
                                   "memory_gb": e.memory(sc.precision), "tool_calling": e.tool_calling, "probe": p})
            ranked.sort(key=lambda c: (-c["score"], c["params_b"]))
            for i, c in enumerate(ranked):
                c["rank"] = i + 1
            r["ranked"] = ranked
            r["candidates"] = [c["model"] for c in ranked[: sc.top_k]]
            if not ranked:
                r["warning"] = "no model could be probed for this site: see unavailable/excluded"

        stage_dir = workspace.stage_dir(STAGE)
        stage_dir.mkdir(parents=True, exist_ok=True)
        workspace.invalidate(STAGE)
        write_json_atomic(stage_dir / CANDIDATES, {"precision": sc.precision, "memory_budget_gb": sc.memory_budget_gb,
                                                  "licences": sc.licences, "sites": report})
        counts = {"sites": len(report), "catalogue": len(entries), "probed_models": len(to_probe),
                  "sites_with_candidates": sum(1 for r in report.values() if r["candidates"]),
                  "available_models": sum(a.available for a in avail.values())}
        manifest = Manifest(stage=STAGE, config_hash=config_hash, input_hash=input_hash, inputs={"cluster": input_hash},
                            counts=counts, timings=timer.total(), files=[CANDIDATES], status="ran" if prev is None else "updated",
                            extra={"availability": avail_key,
                                   "candidates": {n: r["candidates"] for n, r in report.items()}})
        workspace.write_manifest(manifest)
        return manifest


def load_candidates(workspace: Workspace) -> dict[str, Any]:
    import json

    workspace.require_manifest(STAGE, "this stage")
    return json.loads((workspace.stage_dir(STAGE) / CANDIDATES).read_text(encoding="utf-8"))
