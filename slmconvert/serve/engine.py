"""The SLM side of `serve`: route a request to its call site, answer with that site's adapter, and let
the routing policy `evaluate` fitted and verified (slmconvert.policy, WS/eval/policy.json) decide
whether the answer may be returned or the LLM must answer instead.

One base model per catalogue model stays in memory with every site's LoRA adapter attached
(switched per request; slmconvert.models.adapters, the loader evaluate uses). The prompt is
compacted with the recipe the adapter was trained with. Before generating, the request gate: a
request unlike the site's training requests goes to the LLM. After: the answer's kind (the known
task of the tool it called, or "text"), its validity (offered tool, JSON schema) and its confidence
against the policy's rule for that kind.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from slmconvert.chat import fit_prompt, prompt_budget
from slmconvert.collect.textactions import as_text, load_rules, read_actions
from slmconvert.errors import StageError
from slmconvert.invocation import Response
from slmconvert.policy import answer_key, confidence_of, invalid_reason, load_familiarity, load_policy, request_text
from slmconvert.workspace import Workspace


@dataclass
class Decision:
    use_slm: bool
    reason: str
    site: str | None = None
    route_confidence: float | None = None
    similarity: float | None = None  # the request's familiarity to the site's training requests
    task: str | None = None
    confidence: float | None = None
    response: Any = None  # slmconvert.invocation.Response when the SLM answered
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class _Plan(NamedTuple):
    site: str
    adapter: dict
    messages: list[dict]
    tools: list[dict] | None
    text_agent: bool
    t0: float


class SlmEngine:
    def __init__(self, config, workspace: Workspace, *, device: str | None = None, max_new_tokens: int | None = None,
                 backend: str | None = None, backend_sites: dict[str, dict] | None = None, backend_timeout_s: float = 60.0,
                 batch_size: int = 8, batch_wait_ms: float = 5.0, gate_overlap: bool = True, backend_grammar: str = "auto",
                 max_concurrency: int = 64, gate_runtime: str = "auto"):
        from slmconvert.cluster.router import load_router
        from slmconvert.compaction import CompactionRecipe
        from slmconvert.evaluate.stage import FAMILIARITY, HEAD_FILE, POLICY, load_summary
        from slmconvert.finetune.stage import load_artefact
        from slmconvert.finetune.trainer import pick_device
        from slmconvert.io import read_json

        if workspace.read_manifest("evaluate") is None:
            raise StageError(f"serve needs evaluated adapters (which tasks may move to the SLM): run "
                             f"`slmconvert run PIPELINE.yaml` or `slmconvert evaluate --workspace {workspace.root}` first, "
                             "or use --mode proxy")
        self.config = config
        self.workspace = workspace
        self.max_new_tokens = max_new_tokens or config.evaluate.max_new_tokens  # what the policy was verified with
        self.device = pick_device(device)
        summary = load_summary(workspace)
        self.site_tasks: dict[str, list[str]] = defaultdict(list)
        for t in summary["tasks"]:
            self.site_tasks[t["site"]].append(t["task"])
        self.router = load_router(workspace.stage_dir("cluster"))
        self.router.embedder.load()  # now, not inside the first concurrent requests
        # The routing policy evaluate fitted and verified (slmconvert.policy); one copy, shared.
        policy = load_policy(workspace.stage_dir("evaluate") / POLICY)
        if policy is None:
            raise StageError(f"{workspace.stage_dir('evaluate') / POLICY} is missing: this workspace was evaluated by an older "
                             f"slmconvert, before routing policies. Re-run `slmconvert evaluate --workspace {workspace.root} --force` "
                             "(generations are cached), or use --mode proxy")
        self.policy = policy
        self.familiarity = load_familiarity(workspace.stage_dir("evaluate") / FAMILIARITY)
        # Which tool a call names, as evaluate verified it (evaluate.tool_choice: head): the action head, applied to the
        # request gate's vector of the request (so the gate embeds before the engine generates: no overlap then).
        self.head = None
        if policy.doc.get("tool_choice") == "head" and policy.doc.get("constrained_decoding") and policy.doc.get("action_head"):
            from slmconvert.action_head import ActionHead

            self.head = ActionHead.load(workspace.stage_dir("evaluate") / HEAD_FILE)
            if self.head is None or self.familiarity is None:
                raise StageError(f"the routing policy was verified with the action head naming each call's tool, but "
                                 f"{workspace.stage_dir('evaluate') / (HEAD_FILE if self.head is None else FAMILIARITY)} is missing, "
                                 f"damaged or from another slmconvert: re-run `slmconvert evaluate --workspace {workspace.root} --force`")
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
        self._models: dict[str, tuple[Any, Any]] = {}  # model ref -> (peft model, tokenizer)
        # Concurrent requests for one adapter are generated as one batch by a worker per model (the model is
        # not re-entrant; batching, not a lock, is how concurrent requests share it).
        self._batchers: dict[str, MicroBatcher] = {}
        # The request gate's embeddings likewise: GATE_WORKERS encoder threads; requests that arrive while they
        # embed are embedded together next (no waiting window), so concurrent requests neither oversubscribe the
        # cores with one forward pass each nor pay one pass each. What embeds is serve.gate_runtime (ONNX Runtime
        # when installed: about half torch's time per request here; benchmarks/serve_load.py).
        self._gate, self._gate_spare, self.gate_runtime = None, None, None
        if self.familiarity is not None:
            encode, self.gate_runtime = self._gate_encoder(gate_runtime)
            embed = lambda items: list(encode([t for _, t in items]))  # noqa: E731
            self._gate = MicroBatcher(embed, GATE_BATCH, 0.0, GATE_WORKERS)
            # Overlapped with an external engine, the gate embeds in the engine's time, in threads of idle priority
            # that take only CPU nothing else wants (`_gate_beside`); `_gate` is the fallback when the engine is back first.
            if backend and gate_overlap:
                self._gate_spare = MicroBatcher(embed, GATE_BATCH, 0.0, SPARE_GATE_WORKERS, low_priority=True)
        self.batch_size, self.batch_wait_s = batch_size, batch_wait_ms / 1000.0
        self._grammars: dict[str, Any] = {}  # model ref -> ToolGrammars, when the policy was verified constrained
        # An external OpenAI-compatible engine (vLLM, llama-server, Ollama) generates instead of this process:
        # prompts are still compacted and rendered here, and the policy still decides here.
        self.backend = RemoteSlm(backend, backend_sites or {}, backend_timeout_s, max_concurrency) if backend else None
        # With an engine elsewhere, the gate's embedding (CPU, here) runs while the engine generates.
        self._overlap = None
        if self.backend is not None and gate_overlap:
            from concurrent.futures import ThreadPoolExecutor

            self._overlap = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="slm-backend")
        if self.backend is None:
            self._load_models()
        else:
            self._load_tokenizers()
        # the caps on argument lengths the policy was verified with (None for a policy from before them: schemas as given)
        self.argument_bounds: dict[str, dict] = self.policy.doc.get("argument_bounds") or {}
        if self.policy.doc.get("constrained_decoding") and self.backend is None:
            from slmconvert.constrained import tool_grammars

            for key, (model, tok) in self._models.items():
                self._grammars[key] = tool_grammars(tok, getattr(model.config, "vocab_size", None))
        # What the external engine is told of the tool-call grammar, per site (ENGINE_GRAMMARS).
        self.backend_grammar: dict[str, str] = {}
        if self.backend is not None:
            from slmconvert.constrained import ENGINE_GRAMMARS, EngineGrammar

            self._engine_grammar = EngineGrammar()
            for site in self.adapters:
                kind = backend_grammar if backend_grammar != "auto" else (backend_sites or {}).get(site, {}).get("grammar", "none")
                if kind not in ENGINE_GRAMMARS:
                    raise StageError(f"the SLM backend's sites file gives site {site} the grammar {kind!r}; known: "
                                     f"{', '.join(ENGINE_GRAMMARS)}")
                self.backend_grammar[site] = kind if self.policy.doc.get("constrained_decoding") else "none"

    def _gate_encoder(self, runtime: str):
        """(encode, what it is and why) for the request gate: the encoder evaluate fitted the gate's thresholds with
        (Familiarity.encoder), checked on the probe texts against the vectors evaluate saved. A gate fitted with float
        vectors embeds by serve.gate_runtime (ONNX Runtime's equal vectors, or torch). One fitted with int8 vectors
        embeds with the same int8 model; where that cannot be built or gives other vectors (another ONNX Runtime),
        auto falls back to float and says that the gate then judges requests near its thresholds not quite as fitted,
        and onnx makes it an error."""
        from slmconvert.embeddings import INT8_PROBE_TOLERANCE, OnnxEncoder

        embedder = self.router.embedder
        fitted = self.familiarity.encoder
        if fitted.startswith("onnx-int8:"):
            encoder, why = OnnxEncoder.build(embedder, "int8") if runtime != "torch" else (None, "serve.gate_runtime is torch")
            if encoder is not None and self.familiarity.probe is not None:
                got, saved = encoder.probe_vectors(), self.familiarity.probe
                diff = float(abs(got - saved).max()) if got.shape == saved.shape else float("inf")
                if diff <= INT8_PROBE_TOLERANCE:
                    return encoder.encode, f"onnx int8, as evaluate fitted the gate: {why}; probe vectors within {diff:.1g} of evaluate's"
                why = f"this int8 model's vectors differ from evaluate's by {diff:.2g} on probe texts (> {INT8_PROBE_TOLERANCE:g})"
            elif encoder is not None:
                why = "the gate's saved probe vectors are missing"
            if runtime == "onnx":
                raise StageError(f"the request gate was fitted with int8 ONNX vectors, but {why}; re-run `slmconvert evaluate "
                                 f"--workspace {self.workspace.root} --set evaluate.gate_encoder=float --force` to fit it with float "
                                 "vectors, or set serve.gate_runtime to auto")
            fallback = f"the gate was fitted with int8 vectors, but {why}: float vectors here, so requests near its thresholds may be judged otherwise"
            encode, what = self._float_gate(embedder, "torch" if runtime == "torch" else "auto")
            return encode, f"{what} — {fallback}"
        return self._float_gate(embedder, runtime)

    @staticmethod
    def _float_gate(embedder, runtime: str):
        from slmconvert.embeddings import OnnxEncoder

        if runtime == "torch":
            return embedder.encode, "torch (serve.gate_runtime)"
        encoder, why = OnnxEncoder.build(embedder)
        if encoder is not None:
            return encoder.encode, f"onnx: {why}"
        if runtime == "onnx":
            raise StageError(f"serve.gate_runtime is onnx, but {why}; set it to auto or torch to embed with torch")
        return embedder.encode, f"torch ({why})"

    def unconstrained_backend_sites(self) -> list[str]:
        """Sites whose policy was verified with the tool-call grammar but whose external engine decodes freely."""
        if self.backend is None or not self.policy.doc.get("constrained_decoding"):
            return []
        return sorted(s for s, kind in self.backend_grammar.items() if kind == "none" and self.servable(s))

    # ------------------------------------------------------------------ loading
    def _load_models(self) -> None:
        from slmconvert.models.adapters import attach, load_full
        from slmconvert.models.loading import load_model, resolve_model

        by_ref: dict[str, list[dict]] = defaultdict(list)
        for a in self.adapters.values():
            if a["kind"] == "model":  # full fine-tuning: a whole model of its own, with its saved tokenizer
                self._models[a["name"]] = load_full(a["weights"], self.device, with_tokenizer=True)
                a["model_key"] = a["name"]
                continue
            by_ref[a.get("model_ref") or a["model"]].append(a)
        for ref, ads in by_ref.items():
            entry = resolve_model(ref)
            base, tok, _ = load_model(entry, local_folder=self.config.select.local_models.get(entry.name), device=self.device,
                                      download_ok=self.config.select.download)
            model = None
            for a in ads:
                model = attach(base, model, a["weights"], a["name"])
                a["model_key"] = ref
            self._models[ref] = (model, tok)

    def _load_tokenizers(self) -> None:
        """With an external backend only the tokenizer (and chat template) each adapter was trained with is needed here."""
        from transformers import AutoTokenizer

        for a in self.adapters.values():
            a["model_key"] = a["name"]
            self._models[a["name"]] = (None, AutoTokenizer.from_pretrained(a["weights"], local_files_only=True))

    # ------------------------------------------------------------------ answering
    @property
    def sites(self) -> list[str]:
        return sorted(self.adapters)

    def servable(self, site: str) -> bool:
        """Some answer of the site may be returned by the SLM."""
        return self.policy.servable(site)

    def _gate_vector(self, messages: list[dict]):
        return None if self.familiarity is None else self._gate.submit(None, request_text(messages)).result()

    def familiarity_of(self, site: str, messages: list[dict], vec=None) -> float | None:
        vec = self._gate_vector(messages) if vec is None else vec
        return None if vec is None else self.familiarity.score(site, vec[None, :])[0]

    def _head_pick(self, d: "Decision", site: str, vec, messages: list[dict], specs: list) -> list:
        """`specs` narrowed to the tool the action head picks (as evaluate narrowed them); the pick goes in the call log."""
        if self.head is None or vec is None or not specs:
            return specs
        from slmconvert.action_head import narrow_specs

        (name, p), = self.head.choose(site, vec[None, :], [messages], [[n for n, _ in specs]])
        if name is not None:
            d.extra["head_tool"], d.extra["head_probability"] = name, round(p, 4)
        return narrow_specs(specs, name, self.head.known(site))

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

    def _plan(self, messages: list[dict], tools: list[dict] | None) -> tuple[Decision, _Plan | None]:
        """The call site and its adapter (None, reason set: the SLM may not answer this request at all)."""
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
            return d, None
        if not self.servable(site):
            d.reason = f"no kind of answer at call site {site} passed the routing policy"
            return d, None
        return d, _Plan(site, adapter, messages, tools, text_agent, t0)

    def answer(self, messages: list[dict], tools: list[dict] | None) -> Decision:
        if self._overlap is not None:  # the external engine overlapped with the gate: answer_async, on a loop of its own
            import asyncio

            return asyncio.run(self.answer_async(messages, tools))
        d, plan = self._plan(messages, tools)
        return d if plan is None else self._answer_planned(d, plan)

    def _head_applies(self, site: str, tools) -> bool:
        """The action head picks this request's tool (so the gate must embed before the engine generates)."""
        return self.head is not None and site in self.head.sites and bool(tools)

    def _answer_planned(self, d: "Decision", plan: "_Plan") -> Decision:
        """The gate, then generation (here or by the engine), then the policy: one request, blocking."""
        site, adapter, messages, tools, text_agent, t0 = plan
        vec = self._gate_vector(messages)
        d.similarity = self.familiarity_of(site, messages, vec)
        refused = self.policy.admit(site, d.similarity)
        if refused is not None:
            d.reason = refused.reason
            return d
        prompt_or_reason = self._prompt(d, adapter, messages, tools)
        if prompt_or_reason is None:
            return d
        prompt, budget = prompt_or_reason
        tok = self._models[adapter["model_key"]][1]
        from slmconvert.constrained import bounded_specs

        if self.backend is not None:
            grammar_tools = tools
            if self.head is not None and tools:  # the engine's grammar offers only the head's tool, as evaluate's did
                picked = {n for n, _ in self._head_pick(d, site, vec, messages, bounded_specs(tools, self.argument_bounds.get(site), messages))}
                grammar_tools = [t for t in tools if (t.get("function") or t).get("name") in picked] or tools
            try:
                g = self.backend.generate(site, prompt, self.max_new_tokens, self._stops(tok), self._grammar_fields(site, grammar_tools, messages))
            except BackendError as e:
                d.reason = str(e)
                d.seconds = time.perf_counter() - t0
                return d
            return self._decide(d, g, tok, site, messages, tools, text_agent, t0)
        grammars = self._grammars.get(adapter["model_key"])
        specs = bounded_specs(tools, self.argument_bounds.get(site), messages) if grammars is not None else []
        specs = self._head_pick(d, site, vec, messages, specs)
        constraint = grammars.for_specs(specs) if grammars is not None else None
        names = [n for n, _ in specs] if constraint is not None and self.policy.doc.get("tool_choice") == "whole_name" else None
        batcher = self._batchers.get(adapter["model_key"])
        if batcher is None:
            with _BATCHERS_LOCK:
                batcher = self._batchers.setdefault(adapter["model_key"], MicroBatcher(
                    lambda items, key=adapter["model_key"]: self._generate_batch(key, items), self.batch_size, self.batch_wait_s))
        g = batcher.submit(adapter["name"] if adapter["kind"] == "adapter" else None, (prompt, constraint, budget, names)).result()
        return self._decide(d, g, tok, site, messages, tools, text_agent, t0)

    def _grammar_fields(self, site: str, tools, messages: list[dict]) -> dict[str, Any]:
        """The request-body fields that make the external engine decode under the verified grammar ({}: none)."""
        return self._engine_grammar.fields(self.backend_grammar.get(site, "none"), tools, self.argument_bounds.get(site), messages)

    @staticmethod
    def _stops(tok) -> list[str]:
        from slmconvert.chat import special_tokens

        return special_tokens(tok)

    def _prompt(self, d: "Decision", adapter: dict, messages: list[dict], tools) -> tuple[str, int] | None:
        """The compacted prompt rendered with the adapter's template, fitted as evaluate fitted it (None: reason set)."""
        from slmconvert.chat import supports_native_tools
        from slmconvert.compaction import compact, compact_tools

        tok = self._models[adapter["model_key"]][1]
        recipe = adapter["recipe"]
        msgs, tls = compact(messages, recipe), compact_tools(tools, recipe)
        budget = prompt_budget(self.config.finetune.max_length, self.max_new_tokens, self.config.evaluate.max_prompt_tokens)  # as evaluate fits
        fitted = fit_prompt(msgs, tls, tok, budget, supports_native_tools(tok))
        if fitted is None:
            d.reason = "the request does not fit the SLM's context after compaction"
            return None
        prompt, d.prompt_tokens = fitted
        return prompt, budget

    async def answer_async(self, messages: list[dict], tools: list[dict] | None) -> Decision:
        """`answer`, for serve's event loop. With an external engine and the gate overlapped (the defaults with
        --slm-backend), routing, compaction and rendering run on the loop (~1 ms of CPU, which a worker thread
        would spend holding the interpreter lock anyway); only the engine call (a worker thread: urllib3, which
        costs less per call than an asyncio client here) and the gate's embedding leave it, at once, and the
        decision is made when both are back. Each thread hop this saves costs 0.1-0.3 ms, and up to 4 ms at p95 on
        2 busy cores (benchmarks/serve_load.py). Otherwise (generation in this process, or the gate first, or a request
        whose tool the action head picks: the pick shapes the engine's grammar) the blocking `answer` runs in a worker
        thread. This is also what `answer` runs in the overlapped case."""
        from starlette.concurrency import run_in_threadpool

        if self._overlap is None:
            return await run_in_threadpool(self.answer, messages, tools)
        import asyncio

        d, plan = self._plan(messages, tools)
        if plan is None:
            return d
        if self._head_applies(plan.site, plan.tools):  # the head's pick shapes the engine's grammar: the gate first
            return await run_in_threadpool(self._answer_planned, d, plan)
        site, adapter, messages, tools, text_agent, t0 = plan
        prompt_or_reason = self._prompt(d, adapter, messages, tools)
        if prompt_or_reason is None:
            return d
        tok = self._models[adapter["model_key"]][1]
        # the engine generates while the gate embeds the request; the gate's verdict still comes first
        sent_at = time.perf_counter()
        call = EngineCall()
        sent = self._overlap.submit(self.backend.generate, site, prompt_or_reason[0], self.max_new_tokens, self._stops(tok),
                                    self._grammar_fields(site, tools, messages), call)
        # the engine's time as serve saw it (the call, its queue and the HTTP round trip): the rest is serve's own
        sent.add_done_callback(lambda _: d.extra.setdefault("engine_ms", round((time.perf_counter() - sent_at) * 1000, 2)))
        generated = asyncio.wrap_future(sent)
        try:
            if self.familiarity is not None:
                vec, d.extra["gate_wait_ms"] = await self._gate_beside(request_text(messages), generated)
                d.similarity = self.familiarity.score(site, vec[None, :])[0]
            refused = self.policy.admit(site, d.similarity)
            if refused is not None:
                d.reason = refused.reason
                # what became of the engine call the gate made pointless: not started (never sent), back already, or
                # called off mid-generation (the engine stops; its capacity goes to requests the SLM may answer)
                d.extra["engine_call_for_refused_request"] = ("never sent" if sent.cancel() else "answered" if sent.done()
                                                              else "called off")
                return d
            g = await generated
        except BackendError as e:
            d.reason = str(e)
            d.seconds = time.perf_counter() - t0
            return d
        finally:
            # the gate refused, or the client went away: a call not started yet is never sent, a started one is called
            # off; its error is dropped, also when it arrives after `answer`'s own loop has closed
            if not sent.done():
                call.abort()
            generated.cancel()
        return self._decide(d, g, tok, site, messages, tools, text_agent, t0)

    async def _gate_beside(self, text: str, generated) -> tuple[Any, float]:
        """The gate's vector of `text`, embedded while the engine generates (`generated`, awaited elsewhere), and how
        long the request waited for it once the engine was back (ms; 0 when it was ready first). At
        idle priority first: the embedding (11 ms of CPU per request, MiniLM) then takes only CPU that request
        handling does not want: serve's added p95 went from +7.6 to +8.3 ms (niceness 10) to +5.2 to +6.3 ms on 2 busy cores
        (benchmarks/serve_load.py --slm-backend). Once the engine is back, the request waits for the gate alone and
        idle priority could starve it on a busy machine (an engine on the same CPU, say): a copy at normal
        priority races the idle one, and whichever finishes first is taken (the other is not run if it has not started)."""
        import asyncio

        started = [asyncio.wrap_future(self._gate_spare.submit(None, text))]
        try:
            await asyncio.wait([started[0], generated], return_when=asyncio.FIRST_COMPLETED)
            waited = 0.0
            if not started[0].done():
                back = time.perf_counter()
                started.append(asyncio.wrap_future(self._gate.submit(None, text)))
                await asyncio.wait(started, return_when=asyncio.FIRST_COMPLETED)
                waited = round((time.perf_counter() - back) * 1000, 2)
            return next(f for f in started if f.done()).result(), waited
        finally:
            for f in started:  # the slower copy, or both when the client went away: not embedded if not started yet
                f.cancel()

    def _generate_batch(self, model_key: str, items: list[tuple[str | None, tuple]]) -> list:
        """One adapter's queued requests, generated together (greedy, the same budget evaluate verified)."""
        from slmconvert.generation import generate

        model, tok = self._models[model_key]
        adapter_name = items[0][0]
        if adapter_name is not None:
            model.set_adapter(adapter_name)
        grammars = self._grammars.get(model_key)
        prompts = [p for _, (p, _, _, _) in items]
        constraints = [c for _, (_, c, _, _) in items]
        names = [n for _, (_, _, _, n) in items]
        return generate(model, tok, prompts, max_new_tokens=self.max_new_tokens, batch_size=len(prompts),
                        max_prompt_tokens=items[0][1][2], grammars=grammars, constraints=constraints if grammars is not None else None,
                        tool_names=names if grammars is not None and any(n is not None for n in names) else None)

    def _decide(self, d: "Decision", g, tok, site: str, messages: list[dict], tools, text_agent: bool, t0: float) -> "Decision":
        from slmconvert.chat import parse_completion, special_tokens

        d.seconds = time.perf_counter() - t0
        d.completion_tokens = g.new_tokens
        d.confidence = confidence_of(g.as_dict(), self.policy.doc.get("confidence_signal", "mean_logprob"))
        response, ok = parse_completion(g.text, special_tokens(tok))
        d.response = response
        return self._apply_policy(d, site, messages, tools, response, ok, text_agent)


_BATCHERS_LOCK = threading.Lock()
GATE_BATCH = 32  # request-gate texts embedded in one forward pass at most
GATE_WORKERS = 2  # forward passes at once
# The idle-priority gate beside an external engine: one pass at a time. Two idle threads on serve's core shared its
# spare time between them, each pass taking twice as long, and more requests waited for the gate once the engine was
# back: serve's added p95 +4.6 to +6.2 ms with two, +3.8 with one (benchmarks/serve_load.py --pin).
SPARE_GATE_WORKERS = 1


class MicroBatcher:
    """A worker thread that runs queued requests in batches: the first request waits up to `wait_s` for
    others with the same key (the same adapter), at most `max_batch` together; requests for another key
    wait for the next batch, in arrival order. `run(items)` gets [(key, payload)] and returns one
    result per item. `workers` > 1 (batches run at once) is for one key only: items held back for another key
    are shared by the workers, and their order between workers is not kept. A request whose future was cancelled
    before its batch ran is left out of it. `low_priority`: the workers run at idle priority (`_lower_priority`)."""

    def __init__(self, run, max_batch: int, wait_s: float, workers: int = 1, low_priority: bool = False):
        import queue
        from collections import deque

        self.run, self.max_batch, self.wait_s, self.low_priority = run, max_batch, wait_s, low_priority
        self.queue: queue.Queue = queue.Queue()
        self.held: deque = deque()
        self.batches: list[int] = []  # the size of each batch run (for tests and /health)
        self.threads = [threading.Thread(target=self._loop, daemon=True, name="slm-batcher") for _ in range(workers)]
        for t in self.threads:
            t.start()

    def submit(self, key, payload):
        from concurrent.futures import Future

        fut: Future = Future()
        self.queue.put((key, payload, fut))
        return fut

    def _next(self, timeout: float | None):
        import queue

        if self.held:
            return self.held.popleft()
        try:
            return self.queue.get(timeout=timeout) if timeout is None or timeout > 0 else self.queue.get_nowait()
        except queue.Empty:
            return None

    def _loop(self) -> None:
        if self.low_priority:
            _lower_priority()
        while True:
            first = self._next(None)
            batch, later = [first], []
            deadline = time.monotonic() + self.wait_s
            while len(batch) < self.max_batch:
                item = self._next(deadline - time.monotonic())
                if item is None:
                    break
                (batch if item[0] == first[0] else later).append(item)
            self.held.extendleft(reversed(later))
            batch = [item for item in batch if item[2].set_running_or_notify_cancel()]  # cancelled: nobody waits
            if not batch:
                continue
            self.batches.append(len(batch))
            try:
                results = self.run([(k, p) for k, p, _ in batch])
                for (_, _, fut), r in zip(batch, results):
                    fut.set_result(r)
            except BaseException as e:  # every waiting request learns, none hangs
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)


def _lower_priority() -> None:
    """This thread at idle priority: SCHED_IDLE (Linux), where any thread of normal priority that becomes
    runnable preempts it at once; where that is refused, niceness 19 (the lowest); elsewhere nothing. Per
    thread: Linux schedules threads, and these calls take a thread id."""
    import os
    import sys

    if sys.platform.startswith("linux"):
        tid = threading.get_native_id()
        try:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            return
        except (OSError, AttributeError):
            pass
        try:
            os.setpriority(os.PRIO_PROCESS, tid, 19)
        except OSError:  # not permitted in this container: normal priority
            pass


class BackendError(Exception):
    """The external SLM server did not answer usably: the request goes to the LLM with this reason."""


class RemoteSlm:
    """A server that runs the exported SLMs. The prompt serve compacted and rendered with the adapter's chat
    template goes to the engine as text, greedy, with token log-probabilities for the policy's confidence
    signal; the engine must apply no template of its own:
    - OpenAI-compatible engines (vLLM, llama-server): `POST URL/completions`.
    - Ollama: its `/v1/completions` wraps the prompt in the model's TEMPLATE (a second chat template), so
      serve calls Ollama's own `POST /api/generate` with `raw: true` instead. Ollama is recognised by the
      export's sites.json (`api: ollama`) or, without one, by its `/api/version` answering at start.
    The site's model is `slm-<site>` (the export's names) or what the export's sites.json says; a llama.cpp
    adapter id there is sent as llama-server's per-request `lora`. Where the policy was verified with the
    tool-call grammar, the engine is sent it too (`grammar`: slmconvert.constrained.EngineGrammar)."""

    def __init__(self, url: str, sites: dict[str, dict], timeout_s: float, connections: int = 64):
        import urllib3

        self.url = url.rstrip("/")
        self.sites = sites
        # urllib3, not httpx: every SLM answer waits on this call, and urllib3 costs less per call in Python (against
        # a local engine here: p50 1.1 vs 1.6 ms a call, p95 3.1 vs 4.0 ms). One kept-alive connection per request
        # serve lets in at once; no retries (a failed call goes to the LLM instead).
        self.pool = urllib3.PoolManager(num_pools=2, maxsize=connections, block=True, retries=False,
                                        timeout=urllib3.Timeout(connect=min(timeout_s, 10.0), read=timeout_s))
        self.pool.pool_classes_by_scheme = _abortable_pools()  # a started call can be called off (EngineCall.abort)
        self.timeout_s = timeout_s
        self.root = self.url[:-3] if self.url.endswith("/v1") else self.url  # Ollama's native API is beside /v1
        apis = {info.get("api") for info in sites.values() if isinstance(info, dict)}
        self.api = "ollama" if "ollama" in apis else "openai" if apis - {None} else self._probe()
        self.engine = "ollama" if self.api == "ollama" else _engine_of(sites)
        # Greedy with no penalties, said explicitly: the policy was verified on plain greedy decoding, and engines'
        # defaults differ (llama-cpp-python's server and Ollama penalise repeats at 1.1; vLLM takes a model's
        # generation_config, e.g. Qwen2.5's 1.05). Only the engine's own names are sent where it is known (vLLM logs
        # every field it does not know); an unknown engine gets both names.
        self.greedy = dict(NEUTRAL_SAMPLING[self.engine or "unknown"])

    def _probe(self) -> str:
        """ollama when the server answers Ollama's `/api/version`, else openai (the default; nothing is sent on failure)."""
        import urllib3

        try:
            r = self.pool.request("GET", self.root + "/api/version", timeout=min(self.timeout_s, 3.0))
            body = json.loads(r.data) if r.status == 200 else None
        except (urllib3.exceptions.HTTPError, ValueError):
            return "openai"
        return "ollama" if isinstance(body, dict) and isinstance(body.get("version"), str) else "openai"

    def generate(self, site: str, prompt: str, max_new_tokens: int, stops: list[str] | tuple[str, ...] = (),
                 grammar: dict[str, Any] | None = None, call: "EngineCall | None" = None):
        """The engine's answer; `call`, when given, is how another thread calls this one off while it runs
        (`EngineCall.abort`: the engine sees the client go away, BackendError here)."""
        import urllib3

        from slmconvert.export import served_name
        from slmconvert.generation import Generation

        info = self.sites.get(site, {})
        model = info.get("model") or served_name(site)
        stops = [s for s in stops if s]
        if self.api == "ollama":
            url = self.root + "/api/generate"
            body: dict[str, Any] = {"model": model, "prompt": prompt, "raw": True, "stream": False, "logprobs": True,
                                    "options": {"temperature": 0, "num_predict": max_new_tokens, **self.greedy,
                                                **({"stop": stops} if stops else {})}}
        else:
            url = self.url + "/completions"
            body = {"model": model, "prompt": prompt, "max_tokens": max_new_tokens, "temperature": 0, "logprobs": 1, "stream": False,
                    **self.greedy}
            if stops:
                body["stop"] = stops[:4]
            if info.get("lora_id") is not None:
                body["lora"] = [{"id": info["lora_id"], "scale": 1.0}]
            body.update(grammar or {})
        t = time.perf_counter()
        _calling.call = call
        try:
            r = self.pool.request("POST", url, body=json.dumps(body).encode(), headers={"content-type": "application/json"},
                                  preload_content=False)
            try:
                data = r.read()
            finally:
                if call is not None:
                    call.detach()  # before the connection goes back to the pool, where another call may take it
                r.release_conn()
        except (urllib3.exceptions.HTTPError, _CalledOff) as e:
            if call is not None and call.aborted:
                raise BackendError(f"the call to the SLM backend at {self.url} was called off") from None
            # a refused connection is not slowness, though urllib3 2 derives NewConnectionError from ConnectTimeoutError
            if isinstance(e, urllib3.exceptions.TimeoutError) and not isinstance(e, urllib3.exceptions.NewConnectionError):
                raise BackendError(f"the SLM backend at {self.url} did not answer within {self.timeout_s:g} s") from None
            raise BackendError(f"the SLM backend at {self.url} is unreachable ({type(e).__name__})") from None
        finally:
            _calling.call = None
        try:
            payload = json.loads(data)
        except ValueError:
            payload = None
        if r.status != 200 or not isinstance(payload, dict):
            err = payload.get("error") if isinstance(payload, dict) else None
            msg = err.get("message") if isinstance(err, dict) else err if isinstance(err, str) else None
            raise BackendError(f"the SLM backend at {self.url} answered HTTP {r.status}" + (f": {str(msg)[:160]}" if msg else ""))
        text, n, values, tokens = (_ollama_answer if self.api == "ollama" else _openai_answer)(payload)
        if text is None:
            raise BackendError(f"the SLM backend at {self.url} answered without "
                               + ("`response`" if self.api == "ollama" else "choices[0].text"))
        return Generation(text=text, new_tokens=n, mean_logprob=sum(values) / len(values) if values else None,
                          seconds=time.perf_counter() - t, logprobs=values,
                          tokens=tokens if tokens and values and len(tokens) == len(values) else None)


class _CalledOff(Exception):
    """An engine call aborted before it was sent."""


class EngineCall:
    """One call to the external engine that another thread may call off (`abort`) while it runs: its connection's
    socket is shut down, so the blocked read ends at once and the engine sees its client go away (an engine that watches
    for that, as vLLM and llama-server do, stops generating for it). serve calls off an overlapped call when the request gate refuses the
    request, instead of letting the engine finish an answer nobody will read."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conn = None
        self.aborted = False

    def attach(self, conn) -> None:
        with self._lock:
            if self.aborted:
                raise _CalledOff("called off before it was sent")
            self._conn = conn

    def detach(self) -> None:
        with self._lock:
            self._conn = None

    def abort(self) -> None:
        """Call it off: its connection shut down when it is on the wire; when not sent yet, it never is."""
        import socket

        with self._lock:
            self.aborted = True
            sock = getattr(self._conn, "sock", None)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:  # closed meanwhile: nothing left to call off
                    pass


_calling = threading.local()  # the EngineCall of the request this thread is sending (RemoteSlm.generate)


def _abortable_pools() -> dict[str, type]:
    """urllib3 connection pools whose connections hand themselves to the thread's EngineCall as they send."""
    import urllib3
    from urllib3.connection import HTTPConnection, HTTPSConnection

    def abortable(base):
        class Abortable(base):
            def request(self, *args, **kwargs):
                call = getattr(_calling, "call", None)
                if call is not None:
                    call.attach(self)
                return super().request(*args, **kwargs)
        return Abortable

    http = type("AbortableHTTPPool", (urllib3.HTTPConnectionPool,), {"ConnectionCls": abortable(HTTPConnection)})
    https = type("AbortableHTTPSPool", (urllib3.HTTPSConnectionPool,), {"ConnectionCls": abortable(HTTPSConnection)})
    return {"http": http, "https": https}


# Sampling fields that make each engine's greedy decoding plain (no repetition penalties), by engine.
NEUTRAL_SAMPLING: dict[str, dict[str, float]] = {
    "vllm": {"repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0},
    "llamacpp": {"repeat_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0},
    "ollama": {"repeat_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0},
    "unknown": {"repetition_penalty": 1.0, "repeat_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0},
}


def _engine_of(sites: dict[str, dict]) -> str | None:
    """The engine an export's sites.json was written for (`engine`; older exports: told by their fields)."""
    for info in sites.values():
        if not isinstance(info, dict):
            continue
        if info.get("engine") in NEUTRAL_SAMPLING:
            return info["engine"]
        if "lora_id" in info or "base_gguf" in info:
            return "llamacpp"
        if "lora_rank" in info or "adapter" in info:
            return "vllm"
    return None


def _numbers(values) -> list[float] | None:
    if not isinstance(values, list):
        return None
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)] or None


def _token_entries(entries) -> tuple[list[float] | None, list | None]:
    """(log-probabilities, tokens) of a list of `{token, logprob}` entries (tokens None unless every entry has a number)."""
    entries = [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []
    values = _numbers([e.get("logprob") for e in entries])
    return values, [e.get("token") for e in entries] if values and len(values) == len(entries) else None


def _openai_answer(payload: dict) -> tuple[str | None, int, list[float] | None, list | None]:
    """(text, completion tokens, token log-probabilities, tokens) of an OpenAI `/completions` answer. The
    log-probabilities come as the legacy completions API gives them (`tokens`, `token_logprobs`: vLLM,
    llama-cpp-python's server) or as the chat API does (`content: [{token, logprob}]`: llama.cpp's own
    llama-server, which answers `/v1/completions` so; seen with llama.cpp 0.5.0-dev)."""
    choices = payload.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict) or not isinstance(choices[0].get("text"), str):
        return None, 0, None, None
    lp = choices[0].get("logprobs") if isinstance(choices[0].get("logprobs"), dict) else {}
    if "token_logprobs" in lp:
        values = _numbers(lp.get("token_logprobs"))
        tokens = lp.get("tokens") if isinstance(lp.get("tokens"), list) else None
    else:
        values, tokens = _token_entries(lp.get("content"))
    usage = payload.get("usage") if isinstance(payload.get("usage"), dict) else {}
    n = usage.get("completion_tokens") if isinstance(usage.get("completion_tokens"), int) else len(values or [])
    return choices[0]["text"], n, values, tokens


def _ollama_answer(payload: dict) -> tuple[str | None, int, list[float] | None, list | None]:
    """The same of an Ollama `/api/generate` answer (`response`, `eval_count`, `logprobs: [{token, logprob}]`)."""
    if not isinstance(payload.get("response"), str):
        return None, 0, None, None
    values, tokens = _token_entries(payload.get("logprobs"))
    n = payload.get("eval_count") if isinstance(payload.get("eval_count"), int) else len(values or [])
    return payload["response"], n, values, tokens
