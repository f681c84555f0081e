"""serve under bad input: every call logged (odd upstream answers in a reduced form, never dropping the
batch), no raw PII from headers, owner-only log, bounded bodies, upstream errors that are not the client's."""

import json
import os
import stat

import httpx

from slmconvert.serve.app import ServeSettings, create_app
from slmconvert.serve.calllog import CallLogger
from slmconvert.workspace import Workspace
from tests.conftest import FakeLLM, stage_config
from tests.serve.conftest import Uvicorn

KEY = {"Authorization": "Bearer k1"}


def _answer(message, finish="stop"):
    return 200, {"id": "x", "object": "chat.completion", "created": 1, "model": "gpt-4o",
                 "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}],
                 "usage": {"prompt_tokens": 5, "completion_tokens": 2}}


ODD = [
    {"content": None, "refusal": "I can't help with that."},  # a refusal: no content, no tool call
    {"content": None, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": 1'}}]},
    {"content": 42},  # numeric content
]


def _serve(tmp_path, raw, **kw):
    cfg = stage_config(tmp_path / "ws", "scrub.enabled=true")
    logger = CallLogger(Workspace(tmp_path / "ws"), cfg)
    up = FakeLLM(raw=raw)
    app = create_app(ServeSettings(upstream=up.url, mode="proxy", api_keys=["k1"], **kw), logger=logger)
    return app, logger, up


def test_a_burst_with_odd_upstream_answers_logs_every_call(tmp_path):
    def raw(body):
        i = int(body["messages"][-1]["content"].split()[-1])
        return _answer(ODD[i % 3] if i % 2 else {"content": f"fine {i}"})

    app, logger, up = _serve(tmp_path, raw)
    n = 10
    with Uvicorn(app) as srv, httpx.Client(timeout=30) as client:
        for i in range(n):
            r = client.post(f"{srv.url}/v1/chat/completions", headers={**KEY, "x-session-id": "jane.doe@example.com"},
                            json={"model": "gpt-4o", "messages": [{"role": "user", "content": f"Hi, I am Jane Doe, call {i}"}]})
            assert r.status_code == 200
        logger.flush()
    logger.close()
    up.close()
    [path] = (tmp_path / "ws" / "serve").glob("calls-*.jsonl")
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == n and logger.written == n and logger.failed == 0  # every call is on file
    reduced = [x for x in lines if "unlogged_content" in x]
    assert 1 <= len(reduced) <= 5 and logger.reduced == len(reduced)
    assert all("request" not in x for x in reduced)
    text = path.read_text()
    assert "jane.doe@example.com" not in text and "Jane Doe" not in text  # header and body scrubbed
    assert len({x["session_id"] for x in lines}) == 1 and lines[0]["session_id"].startswith("s-")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_chunked_bodies_deep_json_upstream_auth_and_non_object_answers(tmp_path):
    answers = {"auth": (401, {"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}}),
               "list": (200, ["not", "an", "object"])}
    app, logger, up = _serve(tmp_path, lambda body: answers[body["messages"][-1]["content"]], max_body_bytes=4096)
    with Uvicorn(app) as srv, httpx.Client(timeout=30) as client:
        url = f"{srv.url}/v1/chat/completions"

        def chunks():  # no Content-Length: the limit must apply while reading
            yield b'{"messages": [{"role": "user", "content": "'
            for _ in range(1000):
                yield b"x" * 1024
            yield b'"}]}'

        chunked = client.post(url, headers=KEY, content=chunks())
        deep = client.post(url, headers={**KEY, "content-type": "application/json"},
                           content=b"{\"messages\": " + b"[" * 2000 + b"]" * 2000 + b"}")
        auth = client.post(url, headers=KEY, json={"messages": [{"role": "user", "content": "auth"}]})
        listed = client.post(url, headers=KEY, json={"messages": [{"role": "user", "content": "list"}]})
        known = client.get(f"{srv.url}/v1/models/upstream", headers=KEY)
        unknown = client.get(f"{srv.url}/v1/models/gpt-9", headers=KEY)
        nowhere = client.get(f"{srv.url}/v1/nowhere", headers=KEY)
    logger.close()
    up.close()
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"
    assert deep.status_code == 400 and deep.json()["error"]["type"] == "invalid_request_error"
    # the upstream refused *our* key: the client must not be told its own key is wrong
    assert auth.status_code == 502 and auth.json()["error"]["code"] == "upstream_auth"
    assert "SLMCONVERT_UPSTREAM_API_KEY" in auth.json()["error"]["message"]
    assert listed.status_code == 502 and "not an object" in listed.json()["error"]["message"]
    assert known.status_code == 200 and known.json()["id"] == "upstream"
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert nowhere.status_code == 404 and "error" in nowhere.json()
