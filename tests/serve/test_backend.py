"""`serve --slm-backend URL`: an external OpenAI-compatible engine generates, `serve` still compacts the
prompt, routes, gates and logs; a backend that fails sends the request to the LLM, never to the client."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time

import httpx
import pytest
from starlette.requests import Request

from slmconvert.serve.app import ServeSettings, create_app
from slmconvert.serve.calllog import CallLogger
from slmconvert.workspace import Workspace
from tests.serve.conftest import Uvicorn


def fake_backend(seen: list, status: int = 200, delay_s: float = 0.0):
    import asyncio

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(body: dict):
        seen.append(body)
        await asyncio.sleep(delay_s)
        if status != 200:
            return JSONResponse({"error": {"message": "model slm-x is not loaded"}}, status_code=status)
        return {"id": "cmpl-1", "object": "text_completion", "model": body["model"],
                "choices": [{"index": 0, "text": "Ticket filed.", "finish_reason": "stop",
                             "logprobs": {"tokens": ["Ticket", " filed", "."], "token_logprobs": [-0.05, -0.1, -0.01]}}],
                "usage": {"prompt_tokens": 50, "completion_tokens": 3}}

    return app


def disconnect_aware_backend(events: list, delay: dict, path: str = "/v1/completions", label: str = ""):
    """An engine (or, at `path` /chat/completions, an LLM) that takes delay["s"] per answer and, as vLLM does, stops
    generating when its client goes away; `events` says what happened, each prefixed with `label`."""
    from fastapi import FastAPI
    from fastapi.responses import Response

    app = FastAPI()

    @app.post(path)
    async def completions(request: Request):
        await request.json()
        events.append(label + "started")
        deadline = time.monotonic() + delay["s"]
        while time.monotonic() < deadline:
            if await request.is_disconnected():
                events.append(label + "client went away")
                return Response(status_code=499)
            await asyncio.sleep(0.02)
        events.append(label + "answered")
        if path.endswith("/chat/completions"):
            return {"id": "c", "object": "chat.completion", "created": 1, "model": "gpt-4o", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "The LLM answered."}, "finish_reason": "stop"}]}
        return {"choices": [{"index": 0, "text": "Ticket filed.", "finish_reason": "stop"}]}

    return app


def fake_ollama(seen: list):
    """Ollama's native API; its /v1/completions answers what a twice-templated prompt would give."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/api/version")
    async def version():
        return {"version": "0.13.1"}

    @app.post("/api/generate")
    async def generate(body: dict):
        seen.append(("/api/generate", body))
        return {"model": body["model"], "response": "Ticket filed.", "done": True, "eval_count": 3,
                "logprobs": [{"token": "Ticket", "logprob": -0.05}, {"token": " filed", "logprob": -0.1}, {"token": ".", "logprob": -0.01}]}

    @app.post("/v1/completions")
    async def completions(body: dict):
        seen.append(("/v1/completions", body))
        return {"choices": [{"index": 0, "text": "<|im_start|>user", "finish_reason": "stop"}]}

    return app


def test_an_external_engine_answers_and_serve_keeps_the_routing(tuned_ws, tmp_path, upstream):
    import pyarrow.parquet as pq

    from slmconvert.evaluate.stage import run as evaluate
    from slmconvert.export import served_name
    from slmconvert.serve.engine import SlmEngine
    from slmconvert.store import load_invocations
    from tests.evaluate.conftest import copy_ws

    from slmconvert.cli.serve import idle_policy_note
    from slmconvert.policy import load_policy

    ws, cfg = copy_ws(tuned_ws, tmp_path)
    evaluate(cfg, Workspace(ws))
    # the tiny model's policy moves nothing, and serve says so at start, with what evaluate's sample could have shown
    note = idle_policy_note(Workspace(ws), load_policy(ws / "eval" / "policy.json"))
    assert note and "every call goes to the upstream LLM" in note and "could show at most 0%" in note
    assignments = pq.read_table(ws / "clusters" / "assignments.parquet").to_pylist()
    text_only = {a["site"] for a in assignments} - {a["site"] for a in assignments if a["task"].startswith("tool")}
    slm_site = sorted(text_only)[0]
    policy = json.loads((ws / "eval" / "policy.json").read_text())
    policy["rules"] = {slm_site: {"text": {"action": "slm", "min_confidence": None, "reason": "set by hand"}}}
    policy["requests"][slm_site]["min_similarity"] = None  # no request gate: every request of the site reaches the SLM
    (ws / "eval" / "policy.json").write_text(json.dumps(policy))
    assert idle_policy_note(Workspace(ws), load_policy(ws / "eval" / "policy.json")) is None
    by_id = {i.id: i for i in load_invocations(Workspace(ws), "collect")}
    ours = next(by_id[a["invocation_id"]] for a in assignments if a["split"] == "test" and a["site"] == slm_site)
    seen: list = []
    with Uvicorn(fake_backend(seen)) as backend:
        engine = SlmEngine(cfg, Workspace(ws), max_new_tokens=8, backend=backend.url + "/v1")
        assert engine._models and all(model is None for model, _ in engine._models.values())  # no weights in this process
        logger = CallLogger(Workspace(ws), cfg, scrub=False)
        app = create_app(ServeSettings(upstream=upstream.url, mode="convert", no_auth=True), engine=engine, logger=logger)
        with Uvicorn(app) as srv:
            r = httpx.post(f"{srv.url}/v1/chat/completions", json={"model": "gpt-4o", "messages": ours.request.messages}, timeout=60)
        logger.close()
    assert r.status_code == 200 and r.headers["x-slmconvert-answered-by"] == "slm", r.headers
    assert r.json()["choices"][0]["message"]["content"] == "Ticket filed." and not upstream.seen
    # the call log says how long the engine call took and how long the answer then waited for the gate: what
    # serve itself added is the latency minus the engine's time
    [logged] = [json.loads(line) for f in (ws / "serve").glob("calls-*.jsonl") for line in open(f)]
    served = logged["served_by"]
    assert 0 < served["engine_ms"] <= logged["latency_ms"] and served["gate_wait_ms"] >= 0
    [body] = seen
    assert body["model"] == served_name(slm_site) and body["temperature"] == 0 and body["max_tokens"] == 8 and body["logprobs"] == 1
    assert body["prompt"].endswith("<|im_start|>assistant\n")  # rendered here with the adapter's chat template
    assert ours.request.messages[-1]["content"][:30] in body["prompt"]
    # greedy without repetition penalties, as the policy was verified (llama-cpp-python's server and Ollama default
    # to 1.1); an engine serve does not know gets both names, one it knows only its own
    assert body["repetition_penalty"] == body["repeat_penalty"] == 1.0 and body["frequency_penalty"] == 0

    # Ollama: its /v1/completions would wrap the rendered prompt in the Modelfile's template again, so serve
    # recognises it (/api/version) and sends the prompt raw to /api/generate
    native: list = []
    with Uvicorn(fake_ollama(native)) as backend:
        engine = SlmEngine(cfg, Workspace(ws), max_new_tokens=8, backend=backend.url + "/v1")
        d = engine.answer(ours.request.messages, None)
    assert engine.backend.api == "ollama" and d.use_slm and d.response.content == "Ticket filed.", d.reason
    [(path, sent)] = native
    assert path == "/api/generate" and sent["raw"] is True and sent["prompt"] == body["prompt"]
    assert sent["options"]["temperature"] == 0 and sent["options"]["num_predict"] == 8 and d.completion_tokens == 3
    assert sent["options"]["repeat_penalty"] == 1.0 and "repetition_penalty" not in sent["options"]
    assert d.confidence is not None  # Ollama's logprobs feed the policy's confidence signal

    # the gate's idle-priority threads starved (an engine on the same busy CPU, say): once the engine is back, a
    # normal-priority copy of the embedding gives the same verdict instead of waiting for idle CPU
    with Uvicorn(fake_backend([])) as backend:
        engine = SlmEngine(cfg, Workspace(ws), max_new_tokens=8, backend=backend.url + "/v1")
        free = asyncio.run(engine.answer_async(ours.request.messages, None))
        starved, idle_embed, normal_before = threading.Event(), engine._gate_spare.run, len(engine._gate.batches)
        engine._gate_spare.run = lambda items: (starved.wait(60), idle_embed(items))[1]
        d = asyncio.run(engine.answer_async(ours.request.messages, None))
        starved.set()
    assert free.use_slm and d.use_slm and d.response.content == "Ticket filed."
    assert d.similarity == pytest.approx(free.similarity, abs=1e-5) and len(engine._gate.batches) == normal_before + 1
    assert d.extra["gate_wait_ms"] > 0  # the answer waited for the normal-priority copy, and the decision says so

    # a backend that fails: the LLM answers, and the reason says why; the same on serve's event loop (answer_async)
    # as through the blocking call
    def both(engine):
        sync, on_loop = engine.answer(ours.request.messages, None), asyncio.run(engine.answer_async(ours.request.messages, None))
        assert (sync.use_slm, sync.reason) == (on_loop.use_slm, on_loop.reason)
        return sync

    down: list = []
    with Uvicorn(fake_backend(down, status=404)) as backend:
        engine = SlmEngine(cfg, Workspace(ws), max_new_tokens=8, backend=backend.url + "/v1",
                           backend_sites={slm_site: {"model": "triage-v2", "lora_id": 1}})
        d = both(engine)
    assert not d.use_slm and "answered HTTP 404: model slm-x is not loaded" in d.reason
    assert down[0]["model"] == "triage-v2" and down[0]["lora"] == [{"id": 1, "scale": 1.0}]
    assert down[0]["repeat_penalty"] == 1.0 and "repetition_penalty" not in down[0]  # a llama.cpp export's sites: its names only
    engine = SlmEngine(cfg, Workspace(ws), max_new_tokens=8, backend="http://127.0.0.1:9/v1", backend_timeout_s=2)
    d = both(engine)
    assert not d.use_slm and "unreachable" in d.reason
    with Uvicorn(fake_backend([], delay_s=3.0)) as backend:  # up, but slower than serve.slm_backend_timeout_s
        engine = SlmEngine(cfg, Workspace(ws), max_new_tokens=8, backend=backend.url + "/v1", backend_timeout_s=0.5)
        d = both(engine)
    assert not d.use_slm and "did not answer within 0.5 s" in d.reason

    # The request gate refuses: the LLM answers either way. With gate_overlap (the default) the engine was
    # asked while the gate embedded the request and its answer is dropped; without it, never asked.
    policy["requests"][slm_site]["min_similarity"] = 1.01
    (ws / "eval" / "policy.json").write_text(json.dumps(policy))
    for overlap in (True, False):
        asked: list = []
        with Uvicorn(fake_backend(asked)) as backend:
            engine = SlmEngine(cfg, Workspace(ws), max_new_tokens=8, backend=backend.url + "/v1", gate_overlap=overlap)
            for d in (engine.answer(ours.request.messages, None), asyncio.run(engine.answer_async(ours.request.messages, None))):
                assert not d.use_slm and d.reason.startswith(f"request unlike site {slm_site}'s training calls"), d.reason
                assert d.response is None or d.response.content != "Ticket filed."
                if overlap:  # said in the decision: what became of the engine call the refusal made pointless
                    assert d.extra["engine_call_for_refused_request"] in ("never sent", "answered", "called off")
                else:
                    assert asked == [] and "engine_call_for_refused_request" not in d.extra
            if overlap:  # a refused request's engine call mid-generation is called off: the engine sees its client go away
                events: list = []
                delay = {"s": 30.0}
                with Uvicorn(disconnect_aware_backend(events, delay)) as backend:
                    engine = SlmEngine(cfg, Workspace(ws), max_new_tokens=8, backend=backend.url + "/v1")
                    gate = engine._gate_beside

                    async def gate_once_the_engine_works(text, generated):
                        for _ in range(1000):
                            if "started" in events or generated.done():
                                break
                            await asyncio.sleep(0.01)
                        return await gate(text, generated)
                    engine._gate_beside = gate_once_the_engine_works
                    t = time.monotonic()
                    d = asyncio.run(engine.answer_async(ours.request.messages, None))
                    assert not d.use_slm and d.extra["engine_call_for_refused_request"] == "called off"
                    while "client went away" not in events and time.monotonic() - t < 10:
                        time.sleep(0.02)
                    assert events == ["started", "client went away"] and time.monotonic() - t < 10  # not the 30 s answer
                    delay["s"] = 0.0  # the pool's connections still work for the calls after
                    for _ in range(3):
                        assert engine.backend.generate(slm_site, "hello", 4).text == "Ticket filed."
                    # through serve: the LLM answers, and the call log says the engine's call was called off
                    events.clear()
                    delay["s"] = 30.0
                    logger = CallLogger(Workspace(ws), cfg, scrub=False)
                    app = create_app(ServeSettings(upstream=upstream.url, mode="convert", no_auth=True), engine=engine, logger=logger)
                    with Uvicorn(app) as srv:
                        r = httpx.post(f"{srv.url}/v1/chat/completions", json={"model": "gpt-4o", "messages": ours.request.messages},
                                       timeout=60)
                    logger.close()
                    assert r.status_code == 200 and r.headers["x-slmconvert-answered-by"] == "llm"
                    logged = [json.loads(line) for f in (ws / "serve").glob("calls-*.jsonl") for line in open(f)]
                    assert [rec["served_by"].get("engine_call") for rec in logged if rec["served_by"]["by"] == "llm"] == ["called off"]
                    assert events[:1] == ["started"]
        if sys.platform.startswith("linux"):  # overlapped, the gate embeds in the engine's time at idle priority
            assert {os.sched_getscheduler(t.native_id) for t in engine._gate.threads} == {os.SCHED_OTHER}
            if overlap:
                assert {os.sched_getscheduler(t.native_id) for t in engine._gate_spare.threads} == {os.SCHED_IDLE}
            else:
                assert engine._gate_spare is None


def test_the_engine_is_sent_the_grammar_the_policy_was_verified_with(tuned_ws, tmp_path):
    """With a vLLM export's sites.json, the engine gets the structural tag evaluate decoded under: only the
    request's tools, arguments capped by the policy's bounds (here evaluated with greedy tool names; with the action
    head, the next test). Without it the engine decodes freely, and serve says which sites that leaves unlike what was
    verified."""
    import pyarrow.parquet as pq
    import xgrammar as xgr
    from transformers import AutoTokenizer

    from slmconvert.chat import answer_text
    from slmconvert.invocation import Response, ToolCall
    from slmconvert.evaluate.stage import run as evaluate
    from slmconvert.serve.engine import SlmEngine
    from slmconvert.store import load_invocations
    from tests.evaluate.conftest import copy_ws

    ws, cfg = copy_ws(tuned_ws, tmp_path, "evaluate.tool_choice=greedy")
    evaluate(cfg, Workspace(ws))
    policy = json.loads((ws / "eval" / "policy.json").read_text())
    assert policy["constrained_decoding"] and policy["tool_choice"] == "greedy" and "action_head" not in policy
    assert not (ws / "eval" / "action_head.joblib").exists()
    assignments = pq.read_table(ws / "clusters" / "assignments.parquet").to_pylist()
    by_id = {i.id: i for i in load_invocations(Workspace(ws), "collect")}
    ours = next(by_id[a["invocation_id"]] for a in assignments
                if a["split"] == "test" and by_id[a["invocation_id"]].request.tools and by_id[a["invocation_id"]].response.tool_calls)
    site = next(a["site"] for a in assignments if a["invocation_id"] == ours.id)
    policy["rules"][site] = {"text": {"action": "slm", "min_confidence": None, "reason": "set by hand"}}
    policy["requests"][site]["min_similarity"] = None
    (ws / "eval" / "policy.json").write_text(json.dumps(policy))
    seen: list = []
    with Uvicorn(fake_backend(seen)) as backend:
        vllm = SlmEngine(cfg, Workspace(ws), max_new_tokens=8, backend=backend.url + "/v1", gate_overlap=False,
                         backend_sites={site: {"model": "slm-x", "grammar": "structural_tag", "engine": "vllm"}})
        assert vllm.unconstrained_backend_sites() == []
        vllm.answer(ours.request.messages, ours.request.tools)
        free = SlmEngine(cfg, Workspace(ws), max_new_tokens=8, backend=backend.url + "/v1", gate_overlap=False)
        assert site in free.unconstrained_backend_sites()
        free.answer(ours.request.messages, ours.request.tools)
    constrained, unconstrained = seen
    assert "structured_outputs" not in unconstrained
    assert constrained["repetition_penalty"] == 1.0 and "repeat_penalty" not in constrained  # vLLM's name only
    tag = constrained["structured_outputs"]["structural_tag"]
    offered = sorted(t["function"]["name"] for t in ours.request.tools)
    assert sorted(json.loads(t["begin"][len("<tool_call>"):] + "0}")["name"] for t in json.loads(tag)["format"]["tags"]) == offered
    # what vLLM compiles from it (xgrammar, as evaluate did) accepts the LLM's own call and refuses a tool not offered
    tok = AutoTokenizer.from_pretrained(next(iter(vllm.adapters.values()))["weights"])
    compiled = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok)).compile_structural_tag(tag)
    assert xgr.GrammarMatcher(compiled).accept_string(answer_text(ours.response))
    invented = Response(content=None, tool_calls=[ToolCall(name="invented_tool", arguments=ours.response.tool_calls[0].arguments)])
    assert not xgr.GrammarMatcher(compiled).accept_string(answer_text(invented))
    assert xgr.GrammarMatcher(compiled).accept_string("Sure, one moment.")  # text replies stay free
    # a sites file that names a grammar serve cannot send is refused when serve starts, not per request
    import pytest

    from slmconvert.errors import StageError

    with pytest.raises(StageError, match="grammar 'regex'"):
        SlmEngine(cfg, Workspace(ws), max_new_tokens=8, backend="http://127.0.0.1:9/v1", backend_sites={site: {"grammar": "regex"}})


def test_with_the_action_head_the_engine_and_the_local_slm_may_call_only_the_heads_tool(tuned_ws, tmp_path):
    """evaluate.tool_choice: head (the default): evaluate fits the head and says how well it names the LLM's tool on
    held-out sessions; serve narrows the grammar it decodes under (its own SLM's, or the one it sends an engine) to the
    head's pick, as evaluate did, and logs the pick. A workspace whose head file is gone is refused at start."""
    import pyarrow.parquet as pq
    import pytest
    import xgrammar as xgr
    from transformers import AutoTokenizer

    from slmconvert.chat import answer_text
    from slmconvert.errors import StageError
    from slmconvert.evaluate.stage import run as evaluate
    from slmconvert.invocation import Response, ToolCall
    from slmconvert.serve.engine import SlmEngine
    from slmconvert.store import load_invocations
    from tests.evaluate.conftest import copy_ws

    ws, cfg = copy_ws(tuned_ws, tmp_path)
    evaluate(cfg, Workspace(ws))
    policy = json.loads((ws / "eval" / "policy.json").read_text())
    summary = json.loads((ws / "eval" / "summary.json").read_text())
    assert policy["tool_choice"] == "head" and summary["action_head"] == policy["action_head"]
    assignments = pq.read_table(ws / "clusters" / "assignments.parquet").to_pylist()
    by_id = {i.id: i for i in load_invocations(Workspace(ws), "collect")}
    ours = next(by_id[a["invocation_id"]] for a in assignments
                if a["split"] == "test" and by_id[a["invocation_id"]].request.tools and by_id[a["invocation_id"]].response.tool_calls)
    site = next(a["site"] for a in assignments if a["invocation_id"] == ours.id)
    m = policy["action_head"]["sites"][site]
    assert m["fitted"] and m["test_calls"] > 0 and 0 <= m["accuracy"] <= 1 and m["train_calls"] >= 20
    from slmconvert.evaluate.report import pct

    page = (ws / "eval" / "report.html").read_text()
    assert "id='action-heads'" in page and f"<td class='n'>{pct(m['accuracy'])}</td>" in page  # and in the report
    policy["rules"][site] = {"text": {"action": "slm", "min_confidence": None, "reason": "set by hand"}}
    policy["requests"][site]["min_similarity"] = None
    (ws / "eval" / "policy.json").write_text(json.dumps(policy))
    offered = {t["function"]["name"] for t in ours.request.tools}
    seen: list = []
    with Uvicorn(fake_backend(seen)) as backend:
        engine = SlmEngine(cfg, Workspace(ws), max_new_tokens=8, backend=backend.url + "/v1",
                           backend_sites={site: {"model": "slm-x", "grammar": "structural_tag", "engine": "vllm"}})
        d = engine.answer(ours.request.messages, ours.request.tools)
    pick = d.extra["head_tool"]
    assert pick in offered and 0 < d.extra["head_probability"] <= 1
    tag = seen[0]["structured_outputs"]["structural_tag"]
    assert [json.loads(t["begin"][len("<tool_call>"):] + "0}")["name"] for t in json.loads(tag)["format"]["tags"]] == [pick]
    tok = AutoTokenizer.from_pretrained(next(iter(engine.adapters.values()))["weights"])
    compiled = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok)).compile_structural_tag(tag)
    llm_call = ours.response.tool_calls[0]
    other = next(n for n in sorted(offered) if n != pick)
    assert xgr.GrammarMatcher(compiled).accept_string(answer_text(ours.response)) == (llm_call.name == pick)
    elsewhere = Response(content=None, tool_calls=[ToolCall(name=other, arguments=llm_call.arguments)])
    assert not xgr.GrammarMatcher(compiled).accept_string(answer_text(elsewhere))
    assert xgr.GrammarMatcher(compiled).accept_string("Sure, one moment.")  # whether to call a tool stays the SLM's
    # the SLM in this process picks the same tool for the same request
    local = SlmEngine(cfg, Workspace(ws), max_new_tokens=8)
    assert local.answer(ours.request.messages, ours.request.tools).extra["head_tool"] == pick
    (ws / "eval" / "action_head.joblib").unlink()
    with pytest.raises(StageError, match="action_head.joblib is missing"):
        SlmEngine(cfg, Workspace(ws), max_new_tokens=8)


def test_token_log_probabilities_are_read_in_every_shape_engines_answer_completions_with():
    """vLLM and llama-cpp-python's server answer `/v1/completions` with the legacy `tokens` / `token_logprobs`;
    llama.cpp's own llama-server with the chat API's `content: [{token, logprob}]`. Missing them silently left
    every llama-server answer without a confidence, so no confidence-gated rule could return it."""
    from slmconvert.serve.engine import _openai_answer

    legacy = {"choices": [{"text": " Ada.", "logprobs": {"tokens": [" Ada", "."], "token_logprobs": [-0.5, -0.25]}}],
              "usage": {"completion_tokens": 2}}
    chat_shaped = {"choices": [{"text": " Ada.", "logprobs": {"content": [
        {"id": 11, "token": " Ada", "bytes": [32, 65, 100, 97], "logprob": -0.5, "top_logprobs": []},
        {"id": 12, "token": ".", "bytes": [46], "logprob": -0.25, "top_logprobs": []}]}}]}
    for payload in (legacy, chat_shaped):
        assert _openai_answer(payload) == (" Ada.", 2, [-0.5, -0.25], [" Ada", "."])
    assert _openai_answer({"choices": [{"text": "x", "logprobs": None}]}) == ("x", 0, None, None)  # none asked: no confidence


def _hang_up_once(url: str, payload: dict, started) -> None:
    """POST `payload` to serve's chat endpoint on a raw socket and close it, unanswered, once `started()` is true."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(url)
    data = json.dumps(payload).encode()
    with socket.create_connection((u.hostname, u.port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: serve\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(data) + data)
        deadline = time.monotonic() + 20
        while not started() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert started(), "the call never reached the engine"


def _wait_for(events: list, what: str, within_s: float = 10) -> float:
    t = time.monotonic()
    while what not in events and time.monotonic() - t < within_s:
        time.sleep(0.02)
    assert what in events, events
    return time.monotonic() - t


def test_a_client_that_hangs_up_leaves_nothing_working_for_it(tuned_ws, tmp_path):
    """An agent that gives up on a call (its own timeout, a cancelled run) closes the connection. serve then calls off
    the engine call (the engine stops generating, as vLLM and llama-server do when their client goes away) or drops
    the LLM call (its connection closed), frees the request's slot, and logs nothing, since no answer was given."""
    from slmconvert.evaluate.stage import run as evaluate
    from slmconvert.serve.engine import SlmEngine
    from slmconvert.store import load_invocations
    from tests.evaluate.conftest import copy_ws
    import pyarrow.parquet as pq

    ws, cfg = copy_ws(tuned_ws, tmp_path)
    evaluate(cfg, Workspace(ws))
    assignments = pq.read_table(ws / "clusters" / "assignments.parquet").to_pylist()
    slm_site = sorted({a["site"] for a in assignments} - {a["site"] for a in assignments if a["task"].startswith("tool")})[0]
    policy = json.loads((ws / "eval" / "policy.json").read_text())
    policy["rules"] = {slm_site: {"text": {"action": "slm", "min_confidence": None, "reason": "set by hand"}}}
    policy["requests"][slm_site]["min_similarity"] = None
    (ws / "eval" / "policy.json").write_text(json.dumps(policy))
    by_id = {i.id: i for i in load_invocations(Workspace(ws), "collect")}
    ours = next(by_id[a["invocation_id"]] for a in assignments if a["split"] == "test" and a["site"] == slm_site)
    payload = {"model": "gpt-4o", "messages": ours.request.messages}

    events: list = []
    delay = {"s": 30.0}
    with Uvicorn(disconnect_aware_backend(events, delay)) as backend, Uvicorn(disconnect_aware_backend(events, delay, "/chat/completions", "llm: ")) as llm:
        engine = SlmEngine(cfg, Workspace(ws), max_new_tokens=8, backend=backend.url + "/v1")
        logger = CallLogger(Workspace(ws), cfg, scrub=False)
        settings = ServeSettings(upstream=llm.url, mode="convert", no_auth=True, max_concurrency=1, queue_timeout_s=2)
        with Uvicorn(create_app(settings, engine=engine, logger=logger)) as srv:
            _hang_up_once(srv.url, payload, lambda: "started" in events)
            assert _wait_for(events, "client went away") < 10  # the engine stopped: not the 30 s answer
            health = httpx.get(f"{srv.url}/health").json()
            assert health["client_gone"] == 1 and health["slm"] == 0
            delay["s"] = 0.0  # the one slot is free again, and the engine's pool still answers
            r = httpx.post(f"{srv.url}/v1/chat/completions", json=payload, timeout=60)
            assert r.status_code == 200 and r.headers["x-slmconvert-answered-by"] == "slm"
        # the LLM's call is dropped the same way (proxy mode: every request goes upstream)
        delay["s"] = 30.0
        proxy = ServeSettings(upstream=llm.url, mode="proxy", no_auth=True)
        with Uvicorn(create_app(proxy, logger=logger)) as srv:
            _hang_up_once(srv.url, payload, lambda: "llm: started" in events)
            assert _wait_for(events, "llm: client went away") < 10
            assert httpx.get(f"{srv.url}/health").json()["client_gone"] == 1
        logger.close()
    logged = [json.loads(line) for f in (ws / "serve").glob("calls-*.jsonl") for line in open(f)]
    assert [rec["served_by"]["by"] for rec in logged] == ["slm"]  # only the call that was answered
