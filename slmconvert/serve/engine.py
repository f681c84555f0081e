"""The SLM side of `serve`: route a request to its call site, answer with that site's adapter, and
decide from the evaluation whether the answer may be returned or the LLM must answer instead.

One base model per catalogue model stays in memory with every site's LoRA adapter attached
(switched per request). The prompt is compacted with the recipe the adapter was trained with.
The answer's task is found the way `cluster` found tasks: a tool call by its tool name (and
argument shape), a text reply by the nearest text-task centroid of the reply embedding. The
verdict of that task decides: `replace` returns it; `hybrid` returns it when the mean token
log-probability clears the task's threshold; anything else goes to the LLM.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from slmconvert.chat import prompt_budget
from slmconvert.collect.textactions import as_text, load_rules, read_actions
from slmconvert.errors import StageError
from slmconvert.invocation import Response
from slmconvert.policy import answer_key, invalid_reason, load_policy
from slmconvert.workspace import Workspace


@dataclass
class Decision:
    use_slm: bool
    reason: str
    site: str | None = None
    route_confidence: float | None = None
    task: str | None = None
    confidence: float | None = None
    response: Any = None  # slmconvert.invocation.Response when the SLM answered
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class SlmEngine:
    def __init__(self, config, workspace: Workspace, *, device: str | None = None, max_new_tokens: int = 256):
        from slmconvert.cluster.router import load_router
        from slmconvert.compaction import CompactionRecipe
        from slmconvert.evaluate.stage import load_summary
        from slmconvert.finetune.stage import load_artefact
        from slmconvert.finetune.trainer import pick_device
        from slmconvert.io import read_json

        if workspace.read_manifest("evaluate") is None:
            raise StageError(f"serve needs evaluated adapters (which tasks may move to the SLM): run "
                             f"`slmconvert run PIPELINE.yaml` or `slmconvert evaluate --workspace {workspace.root}` first, "
                             "or use --mode proxy")
        self.config = config
        self.workspace = workspace
        self.max_new_tokens = max_new_tokens
        self.device = pick_device(device)
        summary = load_summary(workspace)
        self.verdicts = {(t["site"], t["task"]): t for t in summary["tasks"]}
        self.site_tasks: dict[str, list[str]] = defaultdict(list)
        for site, task in self.verdicts:
            self.site_tasks[site].append(task)
        self.router = load_router(workspace.stage_dir("cluster"))
        # The routing policy evaluate fitted and verified (slmconvert.policy); one copy, shared.
        self.policy = load_policy(workspace.stage_dir("evaluate") / "policy.json")
        fm = workspace.require_manifest("finetune", "serve")
        chosen = summary.get("chosen_adapters", {})
        self.adapters: dict[str, dict[str, Any]] = {}
        for a in fm.extra.get("adapters", []):
            d = workspace.root / a["path"]
            found = load_artefact(d) if chosen.get(a["site"]) == a["model"] else None
            if found is not None:  # the artefact complete.json names, never a stale sibling folder
                kind, weights, record = found
                self.adapters[a["site"]] = {**a, "dir": d, "kind": kind, "weights": weights,
                                            "recipe": CompactionRecipe.from_dict(read_json(d / "recipe.json")),
                                            "name": "site_" + record["fingerprint"][:12]}
        # An agent that acts in plain text ("GET url", "FINISH([...])") was trained on those actions as tool
        # calls: its requests are read with the same rules, and the SLM's calls are written back as its text.
        cm = workspace.read_manifest("collect")
        self.text_actions: dict[str, dict[str, int]] = (cm.extra.get("text_actions") or {}) if cm else {}
        self.text_rules = load_rules(config.collect.text_actions) if self.text_actions else []
        self._lock = threading.Lock()
        self._models: dict[str, tuple[Any, Any]] = {}  # model ref -> (peft model, tokenizer)
        self._centroids: dict[str, tuple[list[str], np.ndarray]] = {}
        self._load_models()
        self._load_centroids()

    # ------------------------------------------------------------------ loading
    def _load_models(self) -> None:
        from peft import PeftModel

        from slmconvert.models.loading import load_model, resolve_model

        by_ref: dict[str, list[dict]] = defaultdict(list)
        for a in self.adapters.values():
            if a["kind"] == "model":  # full fine-tuning: a whole model of its own, with its saved tokenizer
                from transformers import AutoModelForCausalLM, AutoTokenizer

                model = AutoModelForCausalLM.from_pretrained(a["weights"], local_files_only=True).to(self.device).eval()
                self._models[a["name"]] = (model, AutoTokenizer.from_pretrained(a["weights"], local_files_only=True))
                a["model_key"] = a["name"]
                continue
            by_ref[a.get("model_ref") or a["model"]].append(a)
        for ref, ads in by_ref.items():
            entry = resolve_model(ref)
            base, tok, _ = load_model(entry, local_folder=self.config.select.local_models.get(entry.name), device=self.device,
                                      download_ok=self.config.select.download)
            model = None
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                for a in ads:
                    if model is None:
                        model = PeftModel.from_pretrained(base, str(a["weights"]), adapter_name=a["name"])
                    else:
                        model.load_adapter(str(a["weights"]), adapter_name=a["name"])
            model.eval()
            self._models[ref] = (model, tok)
            for a in ads:
                a["model_key"] = ref

    def _load_centroids(self) -> None:
        """Text-task centroids from the cluster stage's own (cached) embeddings of its invocations."""
        from slmconvert.cluster import features as F
        from slmconvert.cluster.stage import CACHE_DIR, load_assignments
        from slmconvert.embeddings import EmbeddingCache, embed_texts
        from slmconvert.store import load_invocations

        text_sites = {s for (s, t) in self.verdicts if t.startswith("text") and s in self.adapters}
        if not text_sites:
            return
        stage, _ = self.workspace.input_manifest("serve")
        by_id = {i.id: i for i in load_invocations(self.workspace, stage)}
        groups: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        for a in load_assignments(self.workspace):
            if a["site"] in text_sites and a["task"].startswith("text") and a["invocation_id"] in by_id:
                groups[a["site"]][a["task"]].append(F.invocation_text(by_id[a["invocation_id"]]))
        cache = EmbeddingCache(self.workspace.stage_dir("cluster") / CACHE_DIR, self.router.embedder.key)
        for site, tasks in groups.items():
            names = sorted(tasks)
            cents = []
            for t in names:
                vecs, _ = embed_texts(tasks[t], self.router.embedder, cache)
                c = vecs.mean(axis=0)
                cents.append(c / (np.linalg.norm(c) or 1.0))
            self._centroids[site] = (names, np.stack(cents))

    # ------------------------------------------------------------------ answering
    @property
    def sites(self) -> list[str]:
        return sorted(self.adapters)

    def servable(self, site: str) -> bool:
        """Some answer of the site may be returned by the SLM (a policy rule, or before policies, a verdict)."""
        if self.policy is not None:
            return self.policy.servable(site)
        return any(self.verdicts[(site, t)]["verdict"] in ("replace", "hybrid") for t in self.site_tasks.get(site, []))

    def _apply_policy(self, d: "Decision", site: str, messages: list[dict], tools, response, ok: bool, text_agent: bool) -> "Decision":
        key = answer_key(response, self.site_tasks.get(site, []), messages)
        verdict = self.policy.decide(site, key, d.confidence, invalid_reason(response, tools, ok))
        d.task, d.use_slm, d.reason = key, verdict.use_slm, verdict.reason
        if d.use_slm and text_agent and response.tool_calls and not self._as_agent_text(d, response):
            d.use_slm = False
        return d

    def _as_agent_text(self, d: "Decision", response) -> bool:
        """The SLM's tool calls written as the text an agent that acts in text reads; False (and the reason) when one has no text form."""
        text = as_text(response.content, [(c.name, c.arguments) for c in response.tool_calls], self.text_rules, self.text_actions)
        if text is None:
            d.reason = "the SLM's action has no text form the agent reads (collect.text_actions)"
            return False
        d.response = Response(content=text, tool_calls=[], finish_reason="stop")
        return True

    def task_of(self, site: str, messages: list[dict], response) -> str | None:
        from slmconvert.cluster import features as F
        from slmconvert.cluster.stage import known_tool_task
        from slmconvert.invocation import Invocation, Request, Source

        inv = Invocation(id="live", source=Source("serve", "live", "-"), session_id="live", step=0,
                         request=Request(messages=messages), response=response)
        known = self.site_tasks.get(site, [])
        key = F.tool_action_key(inv)
        if key is not None:
            return known_tool_task(*key, known)
        if site not in self._centroids:
            return "text" if "text" in known else None
        names, cents = self._centroids[site]
        vec = self.router.embedder.encode([F.invocation_text(inv)])[0]
        return names[int(np.argmax(cents @ vec))]

    def answer(self, messages: list[dict], tools: list[dict] | None) -> Decision:
        from slmconvert.chat import parse_completion, supports_native_tools
        from slmconvert.compaction import compact, compact_tools
        from slmconvert.finetune.data import fit_prompt
        from slmconvert.generation import generate

        t0 = time.perf_counter()
        text_agent = bool(self.text_rules) and not tools
        if text_agent:  # read as collect read the log: the built-in shapes the log used, the declared rules
            messages = read_actions(messages, [r for r in self.text_rules if not r.builtin],
                                    [r for r in self.text_rules if r.builtin and r.name in self.text_actions])
        site, route_conf = self.router.route(messages, tools)
        d = Decision(False, "", site=site, route_confidence=round(route_conf, 4))
        adapter = self.adapters.get(site)
        if adapter is None:
            d.reason = f"no evaluated adapter for call site {site}"
            return d
        if not self.servable(site):
            d.reason = f"no task of call site {site} passed evaluation"
            return d
        model, tok = self._models[adapter["model_key"]]
        recipe = adapter["recipe"]
        msgs, tls = compact(messages, recipe), compact_tools(tools, recipe)
        native = supports_native_tools(tok)
        budget = prompt_budget(self.config.finetune.max_length, self.max_new_tokens)
        fitted = fit_prompt(msgs, tls, tok, budget, native)
        if fitted is None:
            d.reason = "the request does not fit the SLM's context after compaction"
            return d
        prompt, d.prompt_tokens = fitted
        with self._lock:  # one generation at a time per process: the model is not re-entrant
            if adapter["kind"] == "adapter":
                model.set_adapter(adapter["name"])
            [g] = generate(model, tok, [prompt], max_new_tokens=self.max_new_tokens, batch_size=1, max_prompt_tokens=budget)
        d.seconds = time.perf_counter() - t0
        d.completion_tokens, d.confidence = g.new_tokens, g.mean_logprob
        specials = [t for t in (tok.eos_token, tok.pad_token, tok.bos_token) if t]
        response, ok = parse_completion(g.text, specials)
        d.response = response
        if self.policy is not None:
            return self._apply_policy(d, site, messages, tools, response, ok, text_agent)
        if not ok:
            d.reason = "the SLM's tool call is not valid JSON"
            return d
        offered = {(t.get("function", t) or {}).get("name") for t in tools or []}
        if tools and any(c.name not in offered for c in response.tool_calls):
            d.reason = "the SLM called a tool the request does not offer"
            return d
        task = self.task_of(site, messages, response)
        d.task = task
        if text_agent and response.tool_calls:
            if not self._as_agent_text(d, response):
                return d
            response = d.response
        v = self.verdicts.get((site, task)) if task else None
        if v is None:
            d.reason = "the answer matches no evaluated task"
        elif v["verdict"] == "replace":
            d.use_slm, d.reason = True, "task verdict replace"
        elif v["verdict"] == "hybrid" and d.confidence is not None and d.confidence >= v["threshold"]:
            d.use_slm, d.reason = True, f"task verdict hybrid, confidence {d.confidence:.3f} >= {v['threshold']:.3f}"
        elif v["verdict"] == "hybrid":
            d.reason = f"task verdict hybrid, confidence {d.confidence if d.confidence is not None else float('nan'):.3f} below {v['threshold']:.3f}"
        else:
            d.reason = f"task verdict {v['verdict']}"
        return d
