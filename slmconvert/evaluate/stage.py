"""`evaluate`: what does `serve` do with the fine-tuned SLMs, on traffic nothing was tuned on?

On the test split only (sessions never seen in training), per call site, four steps:

1. generate (evaluate/generate.py): a traffic-proportional sample of test calls (rare tasks floored,
   re-weighted); the base SLM (full instructions) and each adapter (its training compaction) answer,
   greedy, batched, cached;
2. score (evaluate/scoring.py): every answer against the LLM's logged response;
3. route (evaluate/routing.py): the routing policy `serve` applies is fitted on calibration sessions
   and verified on the other held-out sessions, with intervals (slmconvert.policy);
4. summarise (evaluate/summary.py): summary.json, results.parquet, report.html, policy.json.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from slmconvert.action_head import HEAD_FILE as ACTION_HEAD_FILE
from slmconvert.config import PipelineConfig
from slmconvert.errors import StageError
from slmconvert.evaluate.summary import EVAL_VERSION
from slmconvert.io import read_json, sha256_obj, write_json_atomic
from slmconvert.progress import NULL_PROGRESS, Progress
from slmconvert.workspace import Manifest, Timer, Workspace

STAGE = "evaluate"
RESULTS = "results.parquet"
SUMMARY = "summary.json"
POLICY = "policy.json"  # what `serve` applies (slmconvert.policy)
FAMILIARITY = "familiarity.npz"  # the request gate's references (slmconvert.policy.Familiarity)
REPORT = "report.html"
GENERATIONS = "generations.jsonl"
HEAD_FILE = ACTION_HEAD_FILE  # which tool a call names (slmconvert.action_head), when evaluate.tool_choice is head


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
    from slmconvert.action_head import VERSION as ACTION_HEAD_VERSION, fit_action_heads
    from slmconvert.cluster.router import load_router
    from slmconvert.cluster.stage import load_assignments, load_tasks
    from slmconvert.constrained import argument_bounds
    from slmconvert.embeddings import EmbeddingCache, GateEncoder, embed_texts
    from slmconvert.evaluate.generate import GenerationCache, generate_all, test_sample
    from slmconvert.evaluate.prices import load_prices
    from slmconvert.evaluate.report import write_report
    from slmconvert.evaluate.routing import familiarity_references, fit_routing_policy, policy_rows
    from slmconvert.evaluate.scoring import add_judge, add_text_similarity, mark_acceptable, score_rows
    from slmconvert.evaluate.summary import choose_adapters, summarise, write_results
    from slmconvert.policy import request_text
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
            train_by_site: dict[str, list] = defaultdict(list)
            for a in load_assignments(workspace):
                inv = by_id.get(a["invocation_id"])
                if inv is not None and a["split"] == "test":
                    test_by_site[a["site"]][a["task"]].append(inv)
                elif inv is not None:
                    train_by_site[a["site"]].append(inv)
        task_kind = {(s, t["task"]): t["kind"] for s, sd in tasks_doc["sites"].items() for t in sd["tasks"]}
        samples = {s: test_sample(bt, ec.max_test_examples, ec.seed, ec.min_per_task) for s, bt in test_by_site.items()}

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
        # how long the LLM's arguments get on each site's training calls: the grammar's caps (serve reads them from the policy)
        bounds = ({s: argument_bounds(train_by_site.get(s, []), ec.copy_arguments, ec.no_repeat_share) for s in samples}
                  if ec.constrained_decoding else {})
        router = load_router(workspace.stage_dir("cluster"))
        gate = GateEncoder.choose(router.embedder, ec.gate_encoder)
        emb_cache = EmbeddingCache(stage_dir / "cache", gate.key)
        head = None
        if ec.constrained_decoding and ec.tool_choice == "head":  # which tool a call names: fitted before generating
            with timer.step("action_head_s"):
                head = fit_action_heads(gate, train_by_site, {s: [i for v in bt.values() for i in v] for s, bt in test_by_site.items()},
                                        emb_cache, progress)
                for site in head.sites:  # embedded now, not under generation's progress bar (then read from the cache)
                    embed_texts([request_text(x.inv.request.messages) for x in samples.get(site, [])], gate, emb_cache, progress,
                                f"embedding {site}'s sampled test calls for the action head")
        with timer.step("generate_s"):
            total = sum(len(samples.get(a["site"], [])) * (2 if ec.base else 1) for a in adapters)
            progress.start("evaluating on the test split", total=total)
            try:
                answers, gen_counts = generate_all(config, workspace, adapters, samples, cache, problems, progress, bounds,
                                                   head=head, gate=gate, emb_cache=emb_cache)
            finally:
                progress.stop()
        with timer.step("score_s"):
            rows = [r for a in answers for r in score_rows(a, task_kind, ec.confidence_signal)]
            used_keys = {r.pop("_key") for r in rows}
            add_text_similarity(rows, config, workspace, progress)
            judge_stats = add_judge(rows, ec.judge, progress) if ec.judge else None
            if judge_stats and judge_stats["failed"]:
                problems.append(f"LLM-as-judge failed on {judge_stats['failed']} of {judge_stats['failed'] + judge_stats['judged']} "
                                f"replies ({judge_stats.get('first_error')}); those fall back to embedding similarity")
            mark_acceptable(rows, ec)
        with timer.step("policy_s"):
            chosen = choose_adapters(rows)
            familiarity = familiarity_references(gate, {s: v for s, v in train_by_site.items() if s in chosen}, ec.seed,
                                                 emb_cache, progress)
            llm_models = {site: ec.llm_model or (sd.get("models") or [None])[0] for site, sd in tasks_doc["sites"].items()}
            prows = policy_rows(rows, chosen, by_id, {site: [t["task"] for t in sd["tasks"]] for site, sd in tasks_doc["sites"].items()},
                                router, familiarity, load_prices(ec.prices), llm_models, emb_cache, gate)
            policy, check = fit_routing_policy(config, tasks_doc, prows,
                                               {s: int(len(v)) for s, v in familiarity.refs.items()})
            policy["argument_bounds"] = {s: b for s, b in bounds.items() if s in chosen}
            policy["gate_encoder"] = {"id": gate.id, "what": gate.why}  # serve embeds requests as these thresholds were fitted
            if head is not None:
                policy["action_head"] = {"version": ACTION_HEAD_VERSION, "encoder": head.encoder,
                                         "sites": {s: m for s, m in head.meta.items() if s in chosen}}
        summary = summarise(config, tasks_doc, rows, adapters, chosen, problems, judge_stats, by_id, policy, check)
        summary["generation"] = gen_counts
        summary["timings"] = timer.total()

        with timer.step("write_s"):
            write_results(stage_dir / RESULTS, rows)
            familiarity.save(stage_dir / FAMILIARITY)
            if head is not None:
                head.save(stage_dir / HEAD_FILE)
            else:
                (stage_dir / HEAD_FILE).unlink(missing_ok=True)  # serve must not apply a head this policy was not verified with
            write_json_atomic(stage_dir / POLICY, policy)
            write_json_atomic(stage_dir / SUMMARY, summary)
            write_report(stage_dir / REPORT, summary, rows, ec.examples_in_report)
            cache.compact_to(used_keys)
        h = summary["headline"]
        counts = {"test_examples": len({r["invocation_id"] for r in rows}), "rows": len(rows), "adapters": len(adapters),
                  "tasks": len(summary["tasks"]), **{f"verdict_{k.replace('-', '_')}": v for k, v in h["verdicts"].items()},
                  "generated_new": summary["generation"]["new"], "generated_cached": summary["generation"]["cached"]}
        manifest = Manifest(stage=STAGE, config_hash=config_hash, input_hash=input_hash,
                            inputs={"cluster": cm.fingerprint(), "finetune": fm.fingerprint()}, counts=counts,
                            timings=timer.total(), files=[RESULTS, SUMMARY, POLICY, FAMILIARITY, REPORT] + ([HEAD_FILE] if head is not None else []), status="ran" if prev is None else "updated",
                            extra={"headline": h, "problems": problems,
                                   "verdicts": {f"{t['site']}/{t['task']}": t["verdict"] for t in summary["tasks"]}})
        workspace.write_manifest(manifest)
        return manifest


def load_summary(workspace: Workspace) -> dict[str, Any]:
    workspace.require_manifest(STAGE, "this command")
    return read_json(workspace.stage_dir(STAGE) / SUMMARY)
