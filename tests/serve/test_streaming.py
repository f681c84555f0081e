"""`stream: true` through `serve`, read with the official `openai` client: upstream streams pass through
as they arrive and are logged whole; an SLM answer (tool calls included) streams once the policy has it."""

from __future__ import annotations

import json

import httpx
import pytest

from slmconvert.invocation import Response, ToolCall
from slmconvert.serve.app import ServeSettings, create_app
from slmconvert.serve.calllog import CallLogger
from slmconvert.serve.engine import Decision
from slmconvert.workspace import Workspace
from tests.conftest import stage_config
from tests.serve.conftest import Uvicorn

openai = pytest.importorskip("openai")

MESSAGES = [{"role": "system", "content": "You are the order desk of Acme."}, {"role": "user", "content": "Where is order 7?"}]
TOOLS = [{"type": "function", "function": {"name": "get_order", "description": "Look an order up.",
                                           "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}}}}]


def _logged(ws):
    return [json.loads(x) for f in (ws / "serve").glob("calls-*.jsonl") for x in f.read_text().splitlines()]


def test_an_upstream_stream_passes_through_and_is_logged_whole(tmp_path, upstream):
    ws = tmp_path / "ws"
    logger = CallLogger(Workspace(ws), stage_config(ws), scrub=False)
    app = create_app(ServeSettings(upstream=upstream.url, mode="proxy", api_keys=["k"], max_concurrency=2), logger=logger)
    with Uvicorn(app) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="k")
        for _ in range(4):  # more streams than concurrency slots: each stream gives its slot back
            chunks = list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True,
                                                         stream_options={"include_usage": True}))
        health = httpx.get(f"{srv.url}/health").json()
    logger.close()
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "The LLM answered." and len([c for c in chunks if c.choices]) > 3  # it came in pieces
    assert chunks[-1].usage.completion_tokens == 4 and chunks[-2].choices[0].finish_reason == "stop"
    assert upstream.seen[-1]["body"]["stream"] is True
    logged = _logged(ws)
    assert len(logged) == 4 and health["llm"] == 4
    rec = logged[-1]
    assert rec["response"]["choices"][0]["message"]["content"] == "The LLM answered."
    assert rec["served_by"] == {"by": "llm", "reason": "proxy mode", "site": None, "streamed": True}
    assert rec["usage"] == {"prompt_tokens": 12, "completion_tokens": 4}


class _Engine:
    """Stands in for SlmEngine: the SLM answered with a tool call the policy accepted."""

    sites = ["site-a"]

    def answer(self, messages, tools):
        return Decision(True, "tool:get_order: rule slm", site="site-a", task="tool:get_order", confidence=-0.1,
                        response=Response(content=None, tool_calls=[ToolCall("get_order", {"order_id": "7", "note": "x" * 60})],
                                          finish_reason="tool_calls"), prompt_tokens=40, completion_tokens=21)

    async def answer_async(self, messages, tools):
        return self.answer(messages, tools)


def test_an_slm_tool_call_streams_in_the_openai_chunk_format(tmp_path, upstream):
    ws = tmp_path / "ws"
    logger = CallLogger(Workspace(ws), stage_config(ws), scrub=False)
    app = create_app(ServeSettings(upstream=upstream.url, mode="convert", no_auth=True), engine=_Engine(), logger=logger)
    with Uvicorn(app) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none")
        raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES, tools=TOOLS, stream=True,
                                                               stream_options={"include_usage": True})
        assert raw.headers["x-slmconvert-answered-by"] == "slm"
        chunks = list(raw.parse())
        plain = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, tools=TOOLS)
    logger.close()
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    name = "".join(tc.function.name or "" for d in deltas for tc in d.tool_calls or [])
    args = "".join(tc.function.arguments or "" for d in deltas for tc in d.tool_calls or [])
    assert name == "get_order" and json.loads(args) == {"order_id": "7", "note": "x" * 60}
    assert sum(1 for d in deltas for _ in d.tool_calls or []) > 2  # the arguments came in several deltas
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].usage.prompt_tokens == 40 and not upstream.seen  # the LLM was never asked
    # streamed or not, the same call: the same tool and arguments
    call = plain.choices[0].message.tool_calls[0]
    assert (call.function.name, json.loads(call.function.arguments)) == (name, json.loads(args))
    assert [r["served_by"]["by"] for r in _logged(ws)] == ["slm", "slm"]


def test_a_stream_request_to_an_upstream_that_answers_whole(tmp_path):
    from tests.conftest import FakeLLM

    up = FakeLLM(raw=lambda body: (200, {"id": "x", "object": "chat.completion", "created": 1, "model": "m",
                                         "choices": [{"index": 0, "message": {"role": "assistant", "content": "whole"},
                                                      "finish_reason": "stop"}]}))
    try:
        app = create_app(ServeSettings(upstream=up.url, mode="proxy", no_auth=True))
        with Uvicorn(app) as srv:
            r = httpx.post(f"{srv.url}/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "stream": True}, timeout=30)
            bad = httpx.post(f"{srv.url}/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "stream": "yes"}, timeout=30)
    finally:
        up.close()
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "whole"
    assert bad.status_code == 400 and "'stream' must be true or false" in bad.json()["error"]["message"]


def test_an_upstream_that_breaks_off_a_whole_answer_to_a_stream_request_is_a_clear_502(tmp_path):
    """The upstream says 200 with a JSON body of 500 bytes, sends 20 and closes: the client gets a 502 naming the
    upstream, not a traceback, and serve's slot is free for the next request."""
    import socket
    import threading

    srv_sock = socket.socket()
    srv_sock.bind(("127.0.0.1", 0))
    srv_sock.listen(4)

    def answer_halfway():
        while True:
            try:
                conn, _ = srv_sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n"
                             b'{"id": "x", "object"')

    threading.Thread(target=answer_halfway, daemon=True).start()
    try:
        app = create_app(ServeSettings(upstream=f"http://127.0.0.1:{srv_sock.getsockname()[1]}", mode="proxy", no_auth=True,
                                       max_concurrency=1, queue_timeout_s=2))
        with Uvicorn(app) as srv:
            for _ in range(2):  # the second finds the one slot free again
                r = httpx.post(f"{srv.url}/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "stream": True}, timeout=30)
                assert r.status_code == 502 and "broke off its answer" in r.json()["error"]["message"], r.text
    finally:
        srv_sock.close()
