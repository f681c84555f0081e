"""`serve --slm-backend URL`: an external OpenAI-compatible engine generates, `serve` still compacts the
prompt, routes, gates and logs; a backend that fails sends the request to the LLM, never to the client."""

from __future__ import annotations

import json

import httpx

from slmconvert.serve.app import ServeSettings, create_app
from slmconvert.serve.calllog import CallLogger
from slmconvert.workspace import Workspace
from tests.serve.conftest import Uvicorn


def fake_backend(seen: list, status: int = 200):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(body: dict):
        seen.append(body)
        if status != 200:
            return JSONResponse({"error": {"message": "model slm-x is not loaded"}}, status_code=status)
        return {"id": "cmpl-1", "object": "text_completion", "model": body["model"],
                "choices": [{"index": 0, "text": "Ticket filed.", "finish_reason": "stop",
                             "logprobs": {"tokens": ["Ticket", " filed", "."], "token_logprobs": [-0.05, -0.1, -0.01]}}],
                "usage": {"prompt_tokens": 50, "completion_tokens": 3}}

    return app


def test_an_external_engine_answers_and_serve_keeps_the_routing(tuned_ws, tmp_path, upstream):
    import pyarrow.parquet as pq

    from slmconvert.evaluate.stage import run as evaluate
    from slmconvert.export import served_name
    from slmconvert.serve.engine import SlmEngine
    from slmconvert.store import load_invocations
    from tests.evaluate.conftest import copy_ws

    ws, cfg = copy_ws(tuned_ws, tmp_path)
    evaluate(cfg, Workspace(ws))
    assignments = pq.read_table(ws / "clusters" / "assignments.parquet").to_pylist()
    text_only = {a["site"] for a in assignments} - {a["site"] for a in assignments if a["task"].startswith("tool")}
    slm_site = sorted(text_only)[0]
    policy = json.loads((ws / "eval" / "policy.json").read_text())
    policy["rules"] = {slm_site: {"text": {"action": "slm", "min_confidence": None, "reason": "set by hand"}}}
    policy["requests"][slm_site]["min_similarity"] = None  # no request gate: every request of the site reaches the SLM
    (ws / "eval" / "policy.json").write_text(json.dumps(policy))
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
    [body] = seen
    assert body["model"] == served_name(slm_site) and body["temperature"] == 0 and body["max_tokens"] == 8 and body["logprobs"] == 1
    assert body["prompt"].endswith("<|im_start|>assistant\n")  # rendered here with the adapter's chat template
    assert ours.request.messages[-1]["content"][:30] in body["prompt"]

    # a backend that fails: the LLM answers, and the reason says why
    down: list = []
    with Uvicorn(fake_backend(down, status=404)) as backend:
        engine = SlmEngine(cfg, Workspace(ws), max_new_tokens=8, backend=backend.url + "/v1",
                           backend_sites={slm_site: {"model": "triage-v2", "lora_id": 1}})
        d = engine.answer(ours.request.messages, None)
    assert not d.use_slm and "answered HTTP 404: model slm-x is not loaded" in d.reason
    assert down[0]["model"] == "triage-v2" and down[0]["lora"] == [{"id": 1, "scale": 1.0}]
    engine = SlmEngine(cfg, Workspace(ws), max_new_tokens=8, backend="http://127.0.0.1:9/v1", backend_timeout_s=2)
    d = engine.answer(ours.request.messages, None)
    assert not d.use_slm and "unreachable" in d.reason

    # The request gate refuses: the LLM answers either way. With gate_overlap (the default) the engine was
    # asked while the gate embedded the request and its answer is dropped; without it, never asked.
    policy["requests"][slm_site]["min_similarity"] = 1.01
    (ws / "eval" / "policy.json").write_text(json.dumps(policy))
    for overlap in (True, False):
        asked: list = []
        with Uvicorn(fake_backend(asked)) as backend:
            engine = SlmEngine(cfg, Workspace(ws), max_new_tokens=8, backend=backend.url + "/v1", gate_overlap=overlap)
            d = engine.answer(ours.request.messages, None)
        assert not d.use_slm and d.reason.startswith(f"request unlike site {slm_site}'s training calls"), d.reason
        assert d.response is None or d.response.content != "Ticket filed."
        if overlap:  # said in the decision: whether the engine did work for a refused request
            assert "engine_generated_for_refused_request" in d.extra
        else:
            assert asked == [] and "engine_generated_for_refused_request" not in d.extra
