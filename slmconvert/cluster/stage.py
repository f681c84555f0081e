"""`cluster`: invocations in; call sites, tasks, a train/test split and a router out (paper step S3).

Two levels (see DESIGN.md): a *call site* is found from request features alone (masked
instruction template + tool set), so that live traffic can be routed to it; a *task* is what
the agent did at that site: the tool name and argument shape of a tool call, or an embedding
cluster of a text reply with the turn that prompted it.

Outputs in clusters/: assignments.parquet, tasks.json, router.joblib + router.json,
report.html, map.png, and the embeddings cache (cache/), which outlives runs.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from slmconvert.cluster import features as F
from slmconvert.config import PipelineConfig
from slmconvert.errors import StageError
from slmconvert.invocation import Invocation
from slmconvert.io import atomic_path, sha256_obj, sha256_text, write_json_atomic, write_parquet_atomic
from slmconvert.progress import NULL_PROGRESS, Progress
from slmconvert.workspace import Manifest, Timer, Workspace

STAGE = "cluster"
ASSIGNMENTS = "assignments.parquet"
TASKS = "tasks.json"
REPORT = "report.html"
MAP = "map.png"
CACHE_DIR = "cache"
# Bump when the same inputs and config would now give different clusters.
ALGORITHM_VERSION = 1


@dataclass
class Row:
    inv: Invocation
    session: str
    template: str
    tools: tuple[str, ...]
    text: str
    site: str = ""
    task: str = ""
    split: str = ""


def _slug(text: str, limit: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:limit].rstrip("-") or "site"


def _config_hash(config: PipelineConfig) -> str:
    cc = config.cluster.model_dump(mode="json", exclude={"batch_size", "device"})
    return sha256_obj({"cluster": cc, "version": ALGORITHM_VERSION})


# ----------------------------------------------------------------------------- sites


def find_sites(rows: list[Row], template_vecs: dict[str, np.ndarray], threshold: float, seed: int) -> None:
    """Set `row.site`. Sites never span two agent names; within one agent, templates are clustered."""
    from slmconvert.cluster.estimators import SiteClusterer
    from slmconvert.cluster.labels import ctfidf_terms

    by_agent: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        by_agent[r.inv.agent or ""].append(r)
    groups: list[tuple[str, list[Row]]] = []
    for agent, agent_rows in sorted(by_agent.items()):
        sigs = sorted({(r.template, r.tools) for r in agent_rows})
        X = np.stack([template_vecs[t] for t, _ in sigs])
        labels = SiteClusterer(distance_threshold=threshold, random_state=seed).fit(X, [set(tl) for _, tl in sigs]).labels_
        sig_site = {sig: int(lab) for sig, lab in zip(sigs, labels)}
        members: dict[int, list[Row]] = defaultdict(list)
        for r in agent_rows:
            members[sig_site[(r.template, r.tools)]].append(r)
        for _, site_rows in sorted(members.items(), key=lambda kv: -len(kv[1])):
            groups.append((agent, site_rows))
    # Names: the agent's name when it has one site; else a template term + a stable hash.
    per_agent = Counter(agent for agent, _ in groups)
    docs = [r.template for i, (_, site_rows) in enumerate(groups) for r in site_rows[:200]]
    labs = [str(i) for i, (_, site_rows) in enumerate(groups) for _ in site_rows[:200]]
    terms = ctfidf_terms(docs, labs, top_n=1)
    used: set[str] = set()
    for i, (agent, site_rows) in enumerate(groups):
        top_template = Counter(r.template for r in site_rows).most_common(1)[0][0]
        if agent and per_agent[agent] == 1:
            name = _slug(agent)
        else:
            term = (terms.get(str(i)) or ["site"])[0]
            prefix = f"{_slug(agent)}-" if agent else "site-"
            name = f"{prefix}{_slug(term, 20)}-{sha256_text(top_template)[:6]}"
        base, n = name, 2
        while name in used:
            name, n = f"{base}-{n}", n + 1
        used.add(name)
        for r in site_rows:
            r.site = name


# ----------------------------------------------------------------------------- tasks


def tool_task_name(names: str, shape: tuple[str, ...] | None = None) -> str:
    """A tool-call task's name: `tool:NAME`, or `tool:NAME(arg,...)` when the tool's argument shapes are tasks of their own."""
    return f"tool:{names}" if shape is None else f"tool:{names}({','.join(shape)})"


def known_tool_task(names: str, shape: tuple[str, ...], known: list[str]) -> str | None:
    """The task, among a site's `known` ones, of a new call of tool NAME with this argument shape;
    None when it is ambiguous (an unseen shape of a tool split by shapes)."""
    for task in (tool_task_name(names, shape), tool_task_name(names)):
        if task in known:
            return task
    shaped = [t for t in known if t.startswith(tool_task_name(names) + "(")]
    return shaped[0] if len(shaped) == 1 else None


def tool_tasks(rows: list[Row], min_size: int) -> None:
    """Tool-call tasks: one per tool name; an argument shape gets its own task when it is common."""
    by_tool: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        names, _ = F.tool_action_key(r.inv)
        by_tool[names].append(r)
    for names, tool_rows in by_tool.items():
        shapes = Counter(F.tool_action_key(r.inv)[1] for r in tool_rows)
        kept = [s for s, n in shapes.most_common() if n >= min_size and n >= 0.1 * len(tool_rows)] or [shapes.most_common(1)[0][0]]
        main = kept[0]
        for r in tool_rows:
            shape = F.tool_action_key(r.inv)[1]
            shape = shape if shape in kept else main
            r.task = tool_task_name(names, None if len(kept) == 1 else shape)


def text_tasks(rows: list[Row], vecs: np.ndarray, cc, seed: int) -> dict[str, Any]:
    from slmconvert.cluster.estimators import TaskClusterer

    if len(rows) < 2 * cc.min_task_size:
        for r in rows:
            r.task = "text"
        return {"method": "too few replies to cluster", "k": 1}
    est = TaskClusterer(method=cc.text_method, k_max=cc.max_text_tasks, min_cluster_size=cc.min_task_size,
                        min_silhouette=cc.min_silhouette,
                        silhouette_tolerance=cc.silhouette_tolerance, random_state=seed).fit(vecs)
    for r, lab in zip(rows, est.labels_):
        r.task = "text" if est.n_clusters_ == 1 else f"text:{lab + 1}"
    return {"method": cc.text_method, "k": int(est.n_clusters_), "silhouette": est.silhouette_,
            "silhouette_by_k": {str(k): v for k, v in est.scores_.items()}}


def prior_tool(inv: Invocation) -> str | None:
    """The tool whose result prompted this call, if any."""
    msgs = inv.request.messages
    if not msgs or msgs[-1].get("role") != "tool":
        return None
    for m in reversed(msgs):
        if m.get("role") == "assistant" and m.get("tool_calls"):
            call = m["tool_calls"][-1]
            fn = call.get("function", call)
            return fn.get("name")
    return msgs[-1].get("name")


# ----------------------------------------------------------------------------- statistics


def _tokens(inv: Invocation) -> tuple[int, int, bool]:
    u = inv.usage
    if u and u.prompt_tokens is not None and u.completion_tokens is not None:
        return u.prompt_tokens, u.completion_tokens, False
    return F.estimate_tokens(F.prompt_chars(inv)), F.estimate_tokens(F.completion_chars(inv)), True


def describe_tasks(rows: list[Row], vecs: np.ndarray, n_examples: int) -> dict[str, Any]:
    from slmconvert.cluster.labels import ctfidf_terms

    totals = {"calls": len(rows), "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}
    tok = [_tokens(r.inv) for r in rows]
    totals["prompt_tokens"] = sum(t[0] for t in tok)
    totals["completion_tokens"] = sum(t[1] for t in tok)
    costs_known = all(r.inv.cost_usd is not None for r in rows)
    totals["cost_usd"] = round(sum(r.inv.cost_usd or 0.0 for r in rows), 6) if costs_known else None
    estimated = any(t[2] for t in tok)

    sites: dict[str, dict[str, Any]] = {}
    by_site: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_site[r.site].append(i)
    for site, idx in by_site.items():
        site_rows = [rows[i] for i in idx]
        terms = ctfidf_terms([F.invocation_text(r.inv) for r in site_rows], [r.task for r in site_rows], top_n=5)
        by_task: dict[str, list[int]] = defaultdict(list)
        for i in idx:
            by_task[rows[i].task].append(i)
        tasks = []
        for task, tidx in sorted(by_task.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            trows = [rows[i] for i in tidx]
            kind = "tool" if task.startswith("tool:") else "text"
            if kind == "tool":
                dominant = Counter(F.tool_action_key(r.inv)[0] for r in trows).most_common(1)[0][0]
                head = dominant
            else:
                prior = Counter(prior_tool(r.inv) for r in trows).most_common(1)[0]
                dominant = prior[0] if prior[0] and prior[1] >= 0.5 * len(trows) else None
                head = f"reply after {dominant}" if dominant else "reply"
            label = f"{head}: {', '.join(terms.get(task, [])[:3])}".rstrip(": ")
            center = vecs[tidx].mean(axis=0)
            nearest = np.argsort(-(vecs[tidx] @ center), kind="stable")[:n_examples]
            pt = sum(tok[i][0] for i in tidx)
            ct = sum(tok[i][1] for i in tidx)
            cost = round(sum(rows[i].inv.cost_usd or 0.0 for i in tidx), 6) if costs_known else None
            tasks.append({
                "task": task, "site": site, "kind": kind, "label": label, "terms": terms.get(task, []),
                "dominant_tool": dominant, "size": len(tidx),
                "train": sum(rows[i].split == "train" for i in tidx), "test": sum(rows[i].split == "test" for i in tidx),
                "sessions": len({rows[i].session for i in tidx}),
                "share_calls": round(len(tidx) / totals["calls"], 4),
                "prompt_tokens": pt, "completion_tokens": ct,
                "share_prompt_tokens": round(pt / max(totals["prompt_tokens"], 1), 4),
                "share_completion_tokens": round(ct / max(totals["completion_tokens"], 1), 4),
                "cost_usd": cost,
                "share_cost": round(cost / totals["cost_usd"], 4) if cost is not None and totals["cost_usd"] else None,
                "examples": [{"invocation_id": trows[j].inv.id, "prompt_turn": F.prompting_turn(trows[j].inv.request.messages, 300),
                              "action": F.action_text(trows[j].inv, 300)} for j in nearest],
            })
        agents = sorted({r.inv.agent for r in site_rows if r.inv.agent})
        templates = Counter(r.template for r in site_rows)
        sites[site] = {
            "site": site, "agents": agents, "size": len(idx), "share_calls": round(len(idx) / totals["calls"], 4),
            "templates": len(templates), "template_head": templates.most_common(1)[0][0][:300],
            "tools": sorted({t for r in site_rows for t in r.tools}),
            "models": sorted({r.inv.model for r in site_rows if r.inv.model}),
            "tasks": tasks,
        }
    return {"totals": {**totals, "tokens_estimated": estimated}, "sites": sites}


# ----------------------------------------------------------------------------- the stage


def _previous_split(workspace: Workspace, prev: Manifest | None) -> dict[str, str]:
    path = workspace.stage_dir(STAGE) / ASSIGNMENTS
    if prev is None or not path.exists() or prev.extra.get("seed_split") is None:
        return {}
    import pyarrow.parquet as pq

    t = pq.read_table(path, columns=["session", "split"]).to_pydict()
    return dict(zip(t["session"], t["split"]))


def run(config: PipelineConfig, workspace: Workspace, *, force: bool = False, progress: Progress = NULL_PROGRESS) -> Manifest:
    from slmconvert.cluster.estimators import SiteRouter
    from slmconvert.cluster.router import Router, request_features
    from slmconvert.cluster.split import session_split
    from slmconvert.embeddings import Embedder, EmbeddingCache, embed_texts
    from slmconvert.store import load_invocations

    cc = config.cluster
    timer = Timer()
    config_hash = _config_hash(config)
    with workspace.lock():
        in_stage, in_manifest = workspace.input_manifest("cluster")
        input_hash = in_manifest.fingerprint()
        prev = workspace.previous(STAGE, force)
        if workspace.unchanged(prev, config_hash, input_hash, force):
            return prev
        previous_split = _previous_split(workspace, prev) if prev and prev.extra.get("test_fraction") == cc.test_fraction \
            and prev.extra.get("seed_split") == cc.seed else {}

        with timer.step("load_s"):
            invocations = load_invocations(workspace, in_stage)
        if len(invocations) < 2:
            raise StageError(f"cluster needs at least 2 invocations; {workspace.stage_dir(in_stage)} has {len(invocations)}. "
                             "Collect more logs first (`slmconvert collect PATH --workspace ...`).")
        rows = []
        for inv in invocations:
            template, tools = F.request_signature(inv.request.messages, inv.request.tools)
            rows.append(Row(inv, inv.session_id or f"invocation:{inv.id}", template, tools, F.invocation_text(inv)))

        embedder = Embedder(cc.embedding_model, cc.batch_size, cc.device, cc.max_seq_length)
        if config.engine == "ray":
            from slmconvert.distributed import RayEncoder

            embedder.remote = RayEncoder(config)
        cache = EmbeddingCache(workspace.stage_dir(STAGE) / CACHE_DIR, embedder.key)
        with timer.step("embed_s"):
            vecs, embed_counts = embed_texts([r.text for r in rows], embedder, cache, progress, "embedding invocations")
            distinct_templates = sorted({r.template for r in rows})
            tvecs, tcounts = embed_texts(distinct_templates, embedder, cache, progress, "embedding templates")
        template_vecs = dict(zip(distinct_templates, tvecs))

        with timer.step("sites_s"):
            find_sites(rows, template_vecs, cc.site_threshold, cc.seed)
        text_info = {}
        with timer.step("tasks_s"):
            by_site: dict[str, list[int]] = defaultdict(list)
            for i, r in enumerate(rows):
                by_site[r.site].append(i)
            for site, idx in by_site.items():
                tool_idx = [i for i in idx if rows[i].inv.response.tool_calls]
                text_idx = [i for i in idx if not rows[i].inv.response.tool_calls]
                tool_tasks([rows[i] for i in tool_idx], cc.min_task_size)
                if text_idx:
                    text_info[site] = text_tasks([rows[i] for i in text_idx], vecs[text_idx], cc, cc.seed)

        with timer.step("split_s"):
            sides = session_split([r.session for r in rows], [f"{r.site}/{r.task}" for r in rows],
                                  cc.test_fraction, cc.seed, previous_split)
            for r, s in zip(rows, sides):
                r.split = s

        warnings_: list[str] = []
        with timer.step("router_s"):
            X = request_features([r.template for r in rows], [r.tools for r in rows], embedder, cache)
            y = np.array([r.site for r in rows])
            train = np.array([r.split == "train" for r in rows])
            test = ~train
            estimator = SiteRouter(random_state=cc.seed).fit(X[train] if train.any() else X, y[train] if train.any() else y)
            if test.any():
                router_acc = float((estimator.predict(X[test]) == y[test]).mean())
            else:
                router_acc = None
                warnings_.append("no test split (one session, or test_fraction 0): the router accuracy and later evaluation have no held-out data")
            if len(set(y)) > 1 and train.any() and len(set(y[train])) < len(set(y)):
                warnings_.append("some call sites have no training sessions; the router cannot predict them")

        with timer.step("describe_s"):
            description = describe_tasks(rows, vecs, cc.examples)
        n_tasks = sum(len(s["tasks"]) for s in description["sites"].values())

        stage_dir = workspace.stage_dir(STAGE)
        stage_dir.mkdir(parents=True, exist_ok=True)
        workspace.invalidate(STAGE)
        with timer.step("write_s"):
            coords = _map_coords(vecs, cc.seed)
            _write_assignments(stage_dir / ASSIGNMENTS, rows, coords)
            files = [ASSIGNMENTS, TASKS, MAP, REPORT]
            router = Router(estimator, cc.embedding_model, {"test_accuracy": router_acc, "trained_on": int(train.sum())},
                            cc.max_seq_length)
            files += router.save(stage_dir)
            doc = {
                "input_stage": in_stage, "embedding_model": cc.embedding_model,
                "split": {"by": "session", "test_fraction": cc.test_fraction, "seed": cc.seed,
                          "train_invocations": int(train.sum()), "test_invocations": int(test.sum()),
                          "train_sessions": len({r.session for r in rows if r.split == "train"}),
                          "test_sessions": len({r.session for r in rows if r.split == "test"}),
                          "kept_from_previous_run": sum(1 for s in {r.session for r in rows} if s in previous_split)},
                "router": {"test_accuracy": router_acc, "sites": estimator.classes_.tolist()},
                "text_clustering": text_info,
                **description,
            }
            write_json_atomic(stage_dir / TASKS, doc)
            from slmconvert.cluster.report import render_map, write_report

            png = render_map(coords, [f"{r.site}/{r.task}" for r in rows])
            with atomic_path(stage_dir / MAP) as tmp:
                tmp.write_bytes(png)
            write_report(stage_dir / REPORT, doc, png)

        counts = {"invocations": len(rows), "sites": len(description["sites"]), "tasks": n_tasks,
                  "tool_tasks": sum(t["kind"] == "tool" for s in description["sites"].values() for t in s["tasks"]),
                  "train": int(train.sum()), "test": int(test.sum()),
                  "embedded_new": embed_counts["encoded"] + tcounts["encoded"],
                  "embedded_cached": embed_counts["cached"] + tcounts["cached"]}
        manifest = Manifest(stage=STAGE, config_hash=config_hash, input_hash=input_hash, inputs={in_stage: input_hash},
                            counts=counts, timings=timer.total(), files=files, status="ran" if prev is None else "updated",
                            extra={"router_test_accuracy": router_acc, "test_fraction": cc.test_fraction, "seed_split": cc.seed,
                                   "embedding_model": cc.embedding_model, "warnings": warnings_,
                                   "sites": {name: {"size": s["size"], "tasks": len(s["tasks"])} for name, s in description["sites"].items()}})
        workspace.write_manifest(manifest)
        return manifest


def _map_coords(vecs: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA

    if vecs.shape[0] < 3:
        return np.zeros((vecs.shape[0], 2), dtype=np.float32)
    return PCA(n_components=2, random_state=seed).fit_transform(vecs).astype(np.float32)


def _write_assignments(path, rows: list[Row], coords: np.ndarray) -> None:
    import pyarrow as pa

    table = pa.table({
        "invocation_id": [r.inv.id for r in rows],
        "session": [r.session for r in rows],
        "site": [r.site for r in rows],
        "task": [r.task for r in rows],
        "split": [r.split for r in rows],
        "x": coords[:, 0].tolist(),
        "y": coords[:, 1].tolist(),
    })
    write_parquet_atomic(path, table)


def load_assignments(workspace: Workspace) -> list[dict[str, Any]]:
    """Rows of clusters/assignments.parquet (invocation_id, session, site, task, split)."""
    import pyarrow.parquet as pq

    workspace.require_manifest(STAGE, "this stage")
    return pq.read_table(workspace.stage_dir(STAGE) / ASSIGNMENTS).to_pylist()


def load_tasks(workspace: Workspace) -> dict[str, Any]:
    workspace.require_manifest(STAGE, "this stage")
    return json.loads((workspace.stage_dir(STAGE) / TASKS).read_text(encoding="utf-8"))
