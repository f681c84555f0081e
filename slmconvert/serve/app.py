"""The OpenAI-compatible HTTP server (FastAPI on uvicorn).

- `POST /v1/chat/completions` (also `stream: true`: server-sent events in the OpenAI chunk format,
  tool-call deltas included; a streamed SLM answer starts once the policy has seen it whole, an
  upstream stream is passed through as it arrives and logged whole when it ends): in `convert` mode
  the call site's SLM answers when the evaluation
  allows it (see `engine.SlmEngine`), otherwise the request goes unchanged to the upstream LLM; in
  `proxy` mode every request goes upstream. Response headers say who answered and why:
  `x-slmconvert-answered-by: slm|llm`, `x-slmconvert-site`, `x-slmconvert-task`, `x-slmconvert-reason`.
- `GET /v1/models`, `GET /health`.
- Client keys (`Authorization: Bearer ...`) are required unless auth is switched off explicitly;
  the upstream key comes from the environment and is sent upstream only, never logged.
- Request size and concurrency limits; malformed requests get OpenAI-style 400 errors; an upstream
  that is down gives a 502, one that is too slow a 504, each with a message that says which.
"""


import asyncio
import hmac
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any


@dataclass
class ServeSettings:
    upstream: str | None
    mode: str = "convert"  # convert | proxy
    api_keys: list[str] = field(default_factory=list)
    no_auth: bool = False
    upstream_key_env: str | None = "SLMCONVERT_UPSTREAM_API_KEY"
    max_body_bytes: int = 4 * 1024 * 1024
    max_concurrency: int = 64
    queue_timeout_s: float = 30.0
    upstream_timeout_s: float = 120.0


def openai_error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status_code=status,
                        headers=headers)


def validate_request(body: Any) -> str | None:
    """Why a chat-completions body is malformed, or None."""
    if not isinstance(body, dict):
        return "the request body must be a JSON object"
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return "'messages' must be a non-empty array"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            return f"messages[{i}] must be an object with a 'role'"
        if m["role"] not in ("system", "developer", "user", "assistant", "tool", "function"):
            return f"messages[{i}].role {m['role']!r} is not a chat role"
    if "tools" in body and body["tools"] is not None and not isinstance(body["tools"], list):
        return "'tools' must be an array"
    if "stream" in body and not isinstance(body["stream"], bool) and body["stream"] is not None:
        return "'stream' must be true or false"
    return None


def completion_body(decision, model_name: str) -> dict[str, Any]:
    """An OpenAI chat.completion for the SLM's answer."""
    resp = decision.response
    message: dict[str, Any] = {"role": "assistant", "content": resp.content if not resp.tool_calls else (resp.content or None)}
    if resp.tool_calls:
        message["tool_calls"] = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                                  "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
                                 for c in resp.tool_calls]
    return {"id": f"chatcmpl-slm-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model_name, "system_fingerprint": f"slmconvert:{decision.site}",
            "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if resp.tool_calls else "stop"}],
            "usage": {"prompt_tokens": decision.prompt_tokens, "completion_tokens": decision.completion_tokens,
                      "total_tokens": decision.prompt_tokens + decision.completion_tokens}}


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"


def completion_chunks(completion: dict[str, Any], include_usage: bool, piece: int = 24) -> list[bytes]:
    """A whole chat.completion as the server-sent events a streaming client reads: the role, the text in
    pieces, each tool call's id and name and then its arguments in pieces, the finish reason, the usage
    (when `stream_options.include_usage`), `[DONE]`."""
    base = {"id": completion["id"], "object": "chat.completion.chunk", "created": completion["created"],
            "model": completion["model"], "system_fingerprint": completion.get("system_fingerprint")}
    choice = completion["choices"][0]
    msg = choice["message"]

    def chunk(delta: dict, finish: str | None = None) -> bytes:
        return sse({**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

    out = [chunk({"role": "assistant", "content": ""})]
    text = msg.get("content") or ""
    out += [chunk({"content": text[i:i + piece]}) for i in range(0, len(text), piece)]
    for k, call in enumerate(msg.get("tool_calls") or []):
        out.append(chunk({"tool_calls": [{"index": k, "id": call["id"], "type": "function",
                                          "function": {"name": call["function"]["name"], "arguments": ""}}]}))
        args = call["function"]["arguments"]
        out += [chunk({"tool_calls": [{"index": k, "function": {"arguments": args[i:i + piece]}}]}) for i in range(0, len(args), piece)]
    out.append(chunk({}, choice["finish_reason"]))
    if include_usage:
        out.append(sse({**base, "choices": [], "usage": completion["usage"]}))
    out.append(b"data: [DONE]\n\n")
    return out


class ChunkAssembler:
    """The chat.completion a stream of chunks adds up to (what the call log stores for a streamed call)."""

    def __init__(self) -> None:
        self.head: dict[str, Any] = {}
        self.content: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}
        self.finish: str | None = None
        self.usage: dict | None = None
        self.done = False

    def feed(self, line: str) -> None:
        if not line.startswith("data:"):
            return
        data = line[5:].strip()
        if data == "[DONE]":
            self.done = True
            return
        try:
            obj = json.loads(data)
        except ValueError:
            return
        if not isinstance(obj, dict):
            return
        for k in ("id", "created", "model", "system_fingerprint"):
            if k in obj and k not in self.head:
                self.head[k] = obj[k]
        if isinstance(obj.get("usage"), dict):
            self.usage = obj["usage"]
        for ch in obj.get("choices") or []:
            delta = ch.get("delta") or {}
            if isinstance(delta.get("content"), str):
                self.content.append(delta["content"])
            for tc in delta.get("tool_calls") or []:
                slot = self.calls.setdefault(tc.get("index", 0), {"id": None, "name": "", "arguments": ""})
                slot["id"] = tc.get("id") or slot["id"]
                fn = tc.get("function") or {}
                slot["name"] += fn.get("name") or ""
                slot["arguments"] += fn.get("arguments") or ""
            if ch.get("finish_reason"):
                self.finish = ch["finish_reason"]

    def completion(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.content) or None}
        if self.calls:
            message["tool_calls"] = [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                                     for _, c in sorted(self.calls.items())]
        out = {"id": self.head.get("id", "chatcmpl-stream"), "object": "chat.completion", "created": self.head.get("created", 0),
               "model": self.head.get("model"), "choices": [{"index": 0, "message": message, "finish_reason": self.finish}]}
        if self.usage:
            out["usage"] = self.usage
        return out


def _header(value: Any) -> str:
    return str(value if value is not None else "").encode("ascii", "replace").decode("ascii")[:200]


WATCH_AFTER_S = 0.25  # a request still unanswered after this long is watched for its client hanging up


def create_app(settings: ServeSettings, *, engine=None, logger=None):
    from contextlib import asynccontextmanager

    import httpx
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.background import BackgroundTask
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from slmconvert.collect.records import MAX_DEPTH, too_deep

    if settings.mode == "convert" and engine is None:
        raise ValueError("convert mode needs an SlmEngine")
    if not settings.no_auth and not settings.api_keys:
        raise ValueError("client API keys are required (or switch auth off explicitly)")
    state: dict[str, Any] = {"requests": 0, "slm": 0, "llm": 0, "errors": 0, "client_gone": 0}

    @asynccontextmanager
    async def lifespan(app):
        limits = httpx.Limits(max_connections=settings.max_concurrency * 2, max_keepalive_connections=settings.max_concurrency)
        state["client"] = httpx.AsyncClient(timeout=settings.upstream_timeout_s, limits=limits)
        state["sem"] = asyncio.Semaphore(settings.max_concurrency)
        try:
            yield
        finally:
            await state["client"].aclose()
            if logger is not None:
                await run_in_threadpool(logger.flush)

    app = FastAPI(title="slmconvert serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def authorised(request: Request) -> bool:
        if settings.no_auth:
            return True
        auth = request.headers.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        return bool(token) and any(hmac.compare_digest(token, k) for k in settings.api_keys)

    async def open_upstream(body: bytes, stream: bool = False):
        """The upstream's response to `body` (left open when `stream`); what is not the upstream's answer raises."""
        if not settings.upstream:
            raise UpstreamError(502, "no upstream LLM is configured (--upstream URL)")
        headers = {"content-type": "application/json"}
        if stream:
            headers["accept"] = "text/event-stream"
        key = os.environ.get(settings.upstream_key_env or "", "") if settings.upstream_key_env else ""
        if key:
            headers["authorization"] = f"Bearer {key}"
        req = state["client"].build_request("POST", settings.upstream.rstrip("/") + "/chat/completions", content=body, headers=headers)
        try:
            r = await state["client"].send(req, stream=stream)
        except httpx.TimeoutException:
            raise UpstreamError(504, f"the upstream LLM at {settings.upstream} did not answer within "
                                     f"{settings.upstream_timeout_s:g} s") from None
        except httpx.HTTPError as e:
            raise UpstreamError(502, f"the upstream LLM at {settings.upstream} is unreachable ({type(e).__name__})") from None
        if r.status_code in (401, 403):  # our upstream key, not the client's: never pass it on as theirs
            await r.aclose()
            raise UpstreamError(502, f"the upstream LLM at {settings.upstream} refused slmconvert's upstream key "
                                     f"(HTTP {r.status_code}); check ${settings.upstream_key_env}", "upstream_auth")
        return r

    async def upstream_call(body: bytes) -> tuple[int, Any, float]:
        t = time.perf_counter()
        r = await open_upstream(body)
        try:
            payload = r.json()
        except ValueError:
            raise UpstreamError(502, f"the upstream LLM at {settings.upstream} answered HTTP {r.status_code} without JSON") from None
        if not isinstance(payload, dict):
            raise UpstreamError(502, f"the upstream LLM at {settings.upstream} answered HTTP {r.status_code} with JSON "
                                     f"that is not an object ({type(payload).__name__})")
        return r.status_code, payload, (time.perf_counter() - t) * 1000.0

    def log_call(body: dict, response: dict, latency_ms: float, served_by: dict, session: str | None) -> None:
        if logger is None:
            return
        record = {"timestamp": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                  "request": body, "response": response, "latency_ms": round(latency_ms, 2), "served_by": served_by}
        if session:
            record["session_id"] = session
        usage = response.get("usage") if isinstance(response, dict) else None
        if isinstance(usage, dict):
            record["usage"] = {k: usage.get(k) for k in ("prompt_tokens", "completion_tokens")}
        logger.log(record)

    @app.get("/health")
    async def health():
        return {"status": "ok", "mode": settings.mode, "upstream": settings.upstream,
                "sites": engine.sites if engine is not None else [],
                "slm_backend_grammar": getattr(engine, "backend_grammar", None) or None,
                "request_gate": getattr(engine, "gate_runtime", None), **{k: v for k, v in state.items() if isinstance(v, int)},
                "logged": logger.written if logger is not None else None,
                "log_failures": logger.failed if logger is not None else None,
                "logged_reduced": logger.reduced if logger is not None else None}

    def model_list() -> list[dict[str, Any]]:
        data = [{"id": f"slmconvert:{s}", "object": "model", "created": 0, "owned_by": "slmconvert"}
                for s in (engine.sites if engine is not None else [])]
        data.append({"id": "upstream", "object": "model", "created": 0, "owned_by": "upstream"})
        return data

    @app.get("/v1/models")
    async def models(request: Request):
        if not authorised(request):
            return openai_error(401, "missing or wrong API key (Authorization: Bearer ...)", "invalid_api_key", code="invalid_api_key")
        return {"object": "list", "data": model_list()}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        if not authorised(request):
            return openai_error(401, "missing or wrong API key (Authorization: Bearer ...)", "invalid_api_key", code="invalid_api_key")
        found = next((m for m in model_list() if m["id"] == model_id), None)
        if found is None:
            return openai_error(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
        return found

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = {404: f"unknown path {request.url.path}", 405: f"method {request.method} is not allowed on {request.url.path}"}
        return openai_error(exc.status_code, message.get(exc.status_code, str(exc.detail)),
                            code="not_found" if exc.status_code == 404 else None)

    async def read_body(request: Request) -> bytes | None:
        """The body, read chunk by chunk: over the limit (chunked uploads included) -> None, early."""
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > settings.max_body_bytes:
            return None
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > settings.max_body_bytes:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    def parse_body(raw: bytes) -> tuple[Any, JSONResponse | None]:
        try:
            body = json.loads(raw)
        except RecursionError:
            return None, openai_error(400, "the request body is nested too deeply to be a chat request")
        except (ValueError, UnicodeDecodeError) as e:
            return None, openai_error(400, f"the request body is not valid JSON ({e})")
        if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and too_deep(body):
            return None, openai_error(400, f"the request body is nested deeper than {MAX_DEPTH} levels")
        problem = validate_request(body)
        if problem:
            return None, openai_error(400, problem, param="messages" if "messages" in problem else None)
        return body, None

    def headers_for(decision, by: str, reason: str) -> dict[str, str]:
        h = {"x-slmconvert-answered-by": by, "x-slmconvert-reason": _header(reason)}
        if decision is not None:
            h.update({"x-slmconvert-site": _header(decision.site), "x-slmconvert-task": _header(decision.task)})
        return h

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        if not authorised(request):
            return openai_error(401, "missing or wrong API key (Authorization: Bearer ...)", "invalid_api_key", code="invalid_api_key")
        raw = await read_body(request)
        if raw is None:
            return openai_error(413, f"request body over {settings.max_body_bytes:,} bytes", code="request_too_large")
        body, error = parse_body(raw)
        if error is not None:
            return error
        try:
            await asyncio.wait_for(state["sem"].acquire(), timeout=settings.queue_timeout_s)
        except asyncio.TimeoutError:
            return openai_error(429, f"too many concurrent requests (limit {settings.max_concurrency})", "rate_limit_error",
                                code="concurrency_limit")
        state["requests"] += 1
        # a client that goes away before its answer is ready (a timeout in the agent, a cancelled run) leaves nothing
        # working for it: the engine call is called off (the engine stops generating), the LLM call is dropped
        # (its connection closed), the slot freed; nothing is logged, since no answer was given. The request runs
        # inline (a task of its own costs every request a scheduling hop: +1 ms at p50 on a busy loop), and only one
        # still unanswered after WATCH_AFTER_S gets a watcher, which cancels it when the client is gone.
        me = asyncio.current_task()
        slot = {"streaming": False}  # a streamed LLM answer frees the slot itself, when the stream ends
        watch: dict[str, Any] = {"inside": True}

        async def watcher() -> None:
            await client_gone(request)
            if watch["inside"]:
                watch["gone"] = True
                me.cancel()

        timer = asyncio.get_running_loop().call_later(WATCH_AFTER_S, lambda: watch.setdefault("task", asyncio.ensure_future(watcher())))
        try:
            answer = await respond(request, body, raw, slot)
            watch["inside"] = False  # from here on the watcher cancels nothing
            return answer
        except asyncio.CancelledError:
            watch["inside"] = False
            if not watch.get("gone") or (hasattr(me, "uncancel") and me.uncancel() > 0):
                raise  # cancelled by someone else (a shutdown) as well
            state["client_gone"] += 1
            return openai_error(499, "the client closed the connection before the answer was ready", code="client_closed_request")
        finally:
            timer.cancel()
            if "task" in watch:
                watch["task"].cancel()
            if not slot["streaming"]:
                state["sem"].release()

    async def client_gone(request: Request) -> None:
        """Returns when the client has closed the connection (its request body already read)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def respond(request: Request, body: dict, raw: bytes, slot: dict):
        from fastapi.responses import StreamingResponse

        session = request.headers.get("x-session-id")
        stream = bool(body.get("stream"))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if isinstance(body.get("stream_options"), dict) else False
        t0 = time.perf_counter()
        decision = None
        if settings.mode == "convert":
            # The decision needs the SLM's whole answer: a streamed SLM answer starts after the gate.
            decision = await engine.answer_async(body["messages"], body.get("tools"))
            if decision.use_slm:
                state["slm"] += 1
                out = completion_body(decision, body.get("model") or f"slmconvert:{decision.site}")
                served = {"by": "slm", "site": decision.site, "task": decision.task, "reason": decision.reason,
                          "confidence": decision.confidence,
                          **{k: decision.extra[k] for k in ("engine_ms", "gate_wait_ms") if k in decision.extra}}
                log_call(body, out, (time.perf_counter() - t0) * 1000.0, served, session)
                headers = headers_for(decision, "slm", decision.reason)
                if stream:
                    chunks = completion_chunks(out, include_usage)

                    async def slm_events():
                        for c in chunks:
                            yield c
                    return StreamingResponse(slm_events(), media_type="text/event-stream", headers=headers)
                return JSONResponse(out, headers=headers)
        reason = "proxy mode" if decision is None else decision.reason
        headers = headers_for(decision, "llm", reason)
        served = {"by": "llm", "reason": reason, "site": decision.site if decision else None}
        if decision is not None and "engine_call_for_refused_request" in decision.extra:  # never sent, called off, answered
            served["engine_call"] = decision.extra["engine_call_for_refused_request"]
        if stream:
            try:
                r = await open_upstream(raw, stream=True)
            except UpstreamError as e:
                state["errors"] += 1
                return openai_error(e.status, e.message, "upstream_error", code=e.code)
            if r.status_code != 200 or "text/event-stream" not in r.headers.get("content-type", ""):
                try:
                    data = await r.aread()
                except httpx.HTTPError as e:
                    state["errors"] += 1
                    return openai_error(502, f"the upstream LLM at {settings.upstream} broke off its answer ({type(e).__name__})",
                                        "upstream_error", code="upstream_unavailable")
                finally:  # also when the client hung up meanwhile: the connection goes back closed, not leaked
                    await r.aclose()
                try:
                    payload = json.loads(data)
                except ValueError:
                    state["errors"] += 1
                    return openai_error(502, f"the upstream LLM at {settings.upstream} answered HTTP {r.status_code} without JSON",
                                        "upstream_error", code="upstream_unavailable")
                if r.status_code == 200 and isinstance(payload, dict):  # a non-streaming answer: pass it on as one
                    state["llm"] += 1
                    log_call(body, payload, (time.perf_counter() - t0) * 1000.0, served, session)
                return JSONResponse(payload, status_code=r.status_code, headers=headers)
            state["llm"] += 1
            slot["streaming"] = True  # the stream releases the slot when it ends

            received: list[bytes] = []
            timing: dict[str, float] = {}

            async def llm_events():
                try:
                    async for chunk in r.aiter_raw():  # bytes on as they come; read for the log after the end
                        received.append(chunk)
                        yield chunk
                    timing["ms"] = (time.perf_counter() - t0) * 1000.0
                finally:
                    await r.aclose()
                    state["sem"].release()

            def log_stream() -> None:  # after the response is sent: costs the client nothing
                if "ms" not in timing:
                    return  # the stream broke off: nothing whole to log
                assembler = ChunkAssembler()
                for line in b"".join(received).decode("utf-8", "replace").splitlines():
                    assembler.feed(line)
                if assembler.done:
                    log_call(body, assembler.completion(), timing["ms"], {**served, "streamed": True}, session)

            return StreamingResponse(llm_events(), media_type="text/event-stream", headers=headers,
                                     background=BackgroundTask(log_stream))
        try:
            status, payload, upstream_ms = await upstream_call(raw)
        except UpstreamError as e:
            state["errors"] += 1
            return openai_error(e.status, e.message, "upstream_error", code=e.code)
        if status == 200:
            state["llm"] += 1
            log_call(body, payload, upstream_ms, served, session)
        return JSONResponse(payload, status_code=status, headers=headers)

    app.state.stats = state
    return app


class UpstreamError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message = status, message
        self.code = code or ("upstream_unavailable" if status == 502 else "upstream_timeout")
