"""`slmconvert serve` with real servers on loopback: routing by verdict, auth, limits, upstream failures, logs."""

import json
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from slmconvert.serve.app import ServeSettings, create_app
from slmconvert.serve.calllog import CallLogger
from slmconvert.workspace import Workspace
from tests.conftest import stage_config
from tests.serve.conftest import FakeUpstream, Uvicorn

KEY = {"Authorization": "Bearer client-key-1"}
PII_REQUEST = {"model": "gpt-4o", "messages": [
    {"role": "system", "content": "You are the billing agent of Acme."},
    {"role": "user", "content": "Hi, I'm Jane Holloway, my email is jane.holloway@example.com and my card is 4111 1111 1111 1111."}]}


def proxy_app(ws, upstream_url, **kw):
    cfg = stage_config(ws, "scrub.enabled=true")
    logger = CallLogger(Workspace(ws), cfg)
    settings = ServeSettings(upstream=upstream_url, mode="proxy", api_keys=["client-key-1"], **kw)
    return create_app(settings, logger=logger), logger


def test_proxy_forwards_every_call_and_logs_it_scrubbed_for_the_next_collect(tmp_path, upstream, monkeypatch):
    monkeypatch.setenv("SLMCONVERT_UPSTREAM_API_KEY", "sk-upstream-secret-999")
    app, logger = proxy_app(tmp_path / "ws", upstream.url)
    n = 24
    with Uvicorn(app) as srv:
        def call(i):
            body = {**PII_REQUEST, "messages": PII_REQUEST["messages"] + [{"role": "user", "content": f"Question {i}"}]}
            return httpx.post(f"{srv.url}/v1/chat/completions", json=body, headers={**KEY, "x-session-id": f"s{i % 4}"}, timeout=30)

        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(call, range(n)))
        health = httpx.get(f"{srv.url}/health").json()
    logger.close()
    assert all(r.status_code == 200 for r in responses)
    assert all(r.json()["choices"][0]["message"]["content"] == "The LLM answered." for r in responses)
    assert all(r.headers["x-slmconvert-answered-by"] == "llm" for r in responses)
    assert len(upstream.seen) == n and all(s["auth"] == "Bearer sk-upstream-secret-999" for s in upstream.seen)
    assert upstream.seen[0]["body"] == {**PII_REQUEST, "messages": PII_REQUEST["messages"] + [upstream.seen[0]["body"]["messages"][-1]]}
    assert health["requests"] == n and health["llm"] == n
    files = list((tmp_path / "ws" / "serve").glob("calls-*.jsonl"))
    text = "".join(f.read_text() for f in files)
    lines = [json.loads(x) for x in text.splitlines()]
    assert len(lines) == n and logger.written == n and logger.failed == 0  # no call lost
    for secret in ("jane.holloway@example.com", "4111 1111 1111 1111", "Holloway", "sk-upstream-secret-999", "client-key-1"):
        assert secret not in text, secret
    assert all(rec["served_by"]["by"] == "llm" and rec["latency_ms"] >= 0 for rec in lines)
    # the log is collect's request-response format: the next run learns from it
    from slmconvert.collect.stage import run as collect

    m = collect(stage_config(tmp_path / "ws2", f"collect.paths=[{tmp_path / 'ws' / 'serve'}]"), Workspace(tmp_path / "ws2"))
    assert m.counts["invocations"] == n and m.counts["quarantined"] == 0 and m.counts["sessions"] == 4


def test_auth_size_and_malformed_requests_get_openai_style_errors(tmp_path, upstream):
    app, logger = proxy_app(tmp_path / "ws", upstream.url, max_body_bytes=2048)
    with Uvicorn(app) as srv:
        url = f"{srv.url}/v1/chat/completions"
        no_key = httpx.post(url, json=PII_REQUEST)
        wrong = httpx.post(url, json=PII_REQUEST, headers={"Authorization": "Bearer nope"})
        bad_json = httpx.post(url, content=b"{not json", headers={**KEY, "content-type": "application/json"})
        no_msgs = httpx.post(url, json={"model": "x"}, headers=KEY)
        bad_role = httpx.post(url, json={"messages": [{"role": "wizard", "content": "hi"}]}, headers=KEY)
        streaming = httpx.post(url, json={**PII_REQUEST, "stream": "yes please"}, headers=KEY)
        too_big = httpx.post(url, json={"messages": [{"role": "user", "content": "x" * 5000}]}, headers=KEY)
        models_no_key = httpx.get(f"{srv.url}/v1/models")
        health = httpx.get(f"{srv.url}/health")
    logger.close()
    assert no_key.status_code == wrong.status_code == models_no_key.status_code == 401
    assert no_key.json()["error"]["code"] == "invalid_api_key"
    for r in (bad_json, no_msgs, bad_role, streaming):
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    assert "not valid JSON" in bad_json.json()["error"]["message"] and "messages" in no_msgs.json()["error"]["message"]
    assert too_big.status_code == 413
    assert health.status_code == 200  # health needs no key
    assert upstream.seen == []  # nothing bad went upstream
    assert logger.written == 0


def test_upstream_down_gives_502_and_slow_gives_504(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"  # nothing listens once closed
    app, logger = proxy_app(tmp_path / "ws", dead)
    with Uvicorn(app) as srv:
        down = httpx.post(f"{srv.url}/v1/chat/completions", json=PII_REQUEST, headers=KEY, timeout=30)
    logger.close()
    assert down.status_code == 502 and "unreachable" in down.json()["error"]["message"]
    slow = FakeUpstream(delay=3.0)
    app, logger = proxy_app(tmp_path / "ws3", slow.url, upstream_timeout_s=0.5)
    with Uvicorn(app) as srv:
        late = httpx.post(f"{srv.url}/v1/chat/completions", json=PII_REQUEST, headers=KEY, timeout=30)
    logger.close()
    slow.close()
    assert late.status_code == 504 and "did not answer within 0.5 s" in late.json()["error"]["message"]


def test_serve_refuses_to_start_without_client_keys_unless_told(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from slmconvert.cli import app

    monkeypatch.delenv("SLMCONVERT_API_KEYS", raising=False)
    r = CliRunner().invoke(app, ["serve", "-w", str(tmp_path / "ws"), "--mode", "proxy", "--upstream", "http://127.0.0.1:9/v1"])
    assert r.exit_code == 2 and "client API keys are required" in r.output and "--no-auth" in r.output


def test_convert_mode_answers_with_the_slm_only_where_the_policy_allows(tuned_ws, tmp_path, upstream):
    """A policy set by hand on an evaluated tiny-model workspace: one site's text answers go to the SLM, the
    others to the LLM; the request gate evaluate fitted turns an off-topic question away."""
    import pyarrow.parquet as pq

    from slmconvert.evaluate.stage import run as evaluate
    from slmconvert.serve.engine import SlmEngine
    from slmconvert.store import load_invocations
    from tests.evaluate.conftest import copy_ws

    ws, cfg = copy_ws(tuned_ws, tmp_path)
    evaluate(cfg, Workspace(ws))
    assignments = pq.read_table(ws / "clusters" / "assignments.parquet").to_pylist()
    text_only = {a["site"] for a in assignments} - {a["site"] for a in assignments if a["task"].startswith("tool")}
    slm_site = sorted(text_only)[0]  # the tool-less triage call site
    # the routing policy serve applies (evaluate fits it; set by hand here): text answers of one site go to the SLM
    policy = json.loads((ws / "eval" / "policy.json").read_text())
    policy["rules"] = {slm_site: {"text": {"action": "slm", "min_confidence": None, "reason": "set by hand"}}}
    (ws / "eval" / "policy.json").write_text(json.dumps(policy))
    engine = SlmEngine(cfg, Workspace(ws), max_new_tokens=8)
    by_id = {i.id: i for i in load_invocations(Workspace(ws), "collect")}
    test = [a for a in assignments if a["split"] == "test"]
    gate = policy["requests"][slm_site]["min_similarity"]
    assert gate is not None  # the request gate evaluate fitted on calibration sessions
    ours = next(by_id[a["invocation_id"]] for a in test if a["site"] == slm_site
                and engine.familiarity_of(slm_site, by_id[a["invocation_id"]].request.messages) >= gate)
    other = next(by_id[a["invocation_id"]] for a in test if a["site"] != slm_site)
    # the same site's instructions with an off-topic question: routed there, refused before the SLM generates
    off_topic = [m for m in ours.request.messages if m["role"] == "system"] + [
        {"role": "user", "content": "Compose a sonnet about whales migrating across the Pacific at dawn."}]
    logger = CallLogger(Workspace(ws), cfg, scrub=False)
    app = create_app(ServeSettings(upstream=upstream.url, mode="convert", no_auth=True), engine=engine, logger=logger)
    with Uvicorn(app) as srv:
        a = httpx.post(f"{srv.url}/v1/chat/completions", json={"model": "gpt-4o", "messages": ours.request.messages}, timeout=60)
        b = httpx.post(f"{srv.url}/v1/chat/completions",
                       json={"model": "gpt-4o", "messages": other.request.messages, "tools": other.request.tools}, timeout=60)
        c = httpx.post(f"{srv.url}/v1/chat/completions", json={"model": "gpt-4o", "messages": off_topic}, timeout=60)
        models = httpx.get(f"{srv.url}/v1/models").json()
    logger.close()
    assert c.headers["x-slmconvert-answered-by"] == "llm" and c.headers["x-slmconvert-site"] == slm_site
    assert c.headers["x-slmconvert-reason"].startswith(f"request unlike site {slm_site}'s training calls")
    assert a.status_code == 200 and a.headers["x-slmconvert-answered-by"] == "slm", a.headers
    assert a.headers["x-slmconvert-site"] == slm_site and a.headers["x-slmconvert-reason"] == "text: rule slm"
    assert a.json()["object"] == "chat.completion" and a.json()["usage"]["completion_tokens"] <= 8
    assert b.status_code == 200 and b.headers["x-slmconvert-answered-by"] == "llm"
    assert b.json()["choices"][0]["message"]["content"] == "The LLM answered."
    assert len(upstream.seen) == 2  # only the other site's request and the off-topic one went to the LLM
    assert {m["id"] for m in models["data"]} >= {f"slmconvert:{slm_site}", "upstream"}
    logged = [json.loads(x) for f in (ws / "serve").glob("calls-*.jsonl") for x in f.read_text().splitlines()]
    assert sorted(r["served_by"]["by"] for r in logged) == ["llm", "llm", "slm"]
    # a workspace evaluated before routing policies: a clear error naming the fix, not a silent fallback
    from slmconvert.errors import StageError

    (ws / "eval" / "policy.json").unlink()
    with pytest.raises(StageError, match="evaluate .*--force"):
        SlmEngine(cfg, Workspace(ws), max_new_tokens=8)
