"""Load on `slmconvert serve` over loopback: the latency the proxy adds, and that no call is lost.

    python benchmarks/serve_load.py [--clients 50] [--requests 2000] [--malformed 0.1] [--stream]
    HF_HUB_OFFLINE=1 python benchmarks/serve_load.py --slm workspace/quickstart [--slm-requests 20]

1. Proxy mode (`slmconvert serve --mode proxy`, its own process) in front of a local fake upstream
   (an uvicorn app in another process that answers at once): N concurrent clients (bounded, from
   this process) send chat completions straight to the upstream, then through the proxy. Prints
   requests/s and p50/p95 latency both ways; the overhead is their difference. Then stops the proxy
   gracefully and counts the log: one scrubbed line per request (zero lost).
   With --stream, every request has `stream: true` and the upstream answers in server-sent events:
   latency is to the last byte, and time to first byte is printed too; the log must hold each
   streamed call whole.
2. With --slm-backend WS: `serve --mode convert --slm-backend` on a converted workspace, in its own
   process, in front of a fake OpenAI-compatible SLM engine (another process, answering at once);
   the workspace's test-split requests that its (opened) policy lets the SLM answer, `--bodies` of them in
   turn, as logged (the gate embeds each one's real prompting turn), N concurrent clients. Prints the latency straight to the
   engine and through serve (routing, the request gate, compaction and prompt rendering, the policy):
   what serve adds over the engine. `--engine-ms MS` makes the fake engine take MS per answer, as a
   real one does generating; `--no-overlap` runs the request gate before the engine instead of
   while it generates (serve.gate_overlap); `--gate-runtime torch|onnx` picks what embeds for the gate
   (serve.gate_runtime; auto: ONNX Runtime when installed); `--no-gate` drops the gate from the copy (what the gate costs);
   `--serve-set KEY=VALUE` passes a --set to serve.
3. With --slm WS: convert mode on a converted workspace on CPU; latency per request of the SLM path
   (requests drawn from the workspace's test split, one client at a time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# Answers real upstreams give that a call log must still record: a refusal (no content, no tool call),
# tool-call arguments cut off mid-JSON, a number where text belongs.
MALFORMED = [{"content": None, "refusal": "I can't help with that."},
             {"content": None, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": 1'}}]},
             {"content": 42}]


def fake_upstream_app(malformed: float = 0.0):
    """Answers at once; `malformed` of the answers (every 1/share-th request, by its number) are odd ones."""
    from fastapi import FastAPI

    app = FastAPI()
    every = round(1 / malformed) if malformed > 0 else 0

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        if body.get("stream"):
            from fastapi.responses import StreamingResponse

            head = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": body.get("model", "m")}
            deltas = [{"role": "assistant", "content": ""}, {"content": "o"}, {"content": "k"}]
            events = [{**head, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
            events.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})

            async def gen():
                for e in events:
                    yield f"data: {json.dumps(e)}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(gen(), media_type="text/event-stream")
        tail = str(body["messages"][-1].get("content", ""))
        n = int(tail[1:]) if tail[:1] == "n" and tail[1:].isdigit() else 0
        message = MALFORMED[n % len(MALFORMED)] if every and n % every == 0 else {"content": "ok"}
        return {"id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": body.get("model", "m"),
                "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}}

    return app


class Server:
    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join()


TTFB: dict[str, list[float]] = {}


async def load(url: str, body: dict | list[dict], clients: int, total: int, headers: dict, rate: float | None = None,
               tag: bool = True) -> tuple[list[float], float, int]:
    """`clients` concurrent connections send `total` requests; with `rate`, requests start on a fixed
    schedule (open loop, `rate` per second in all), so latency is measured below saturation. Streamed
    requests: latency to the last byte; the time to the first byte goes to TTFB[url]. A list of bodies is
    sent in turn; `tag` appends a numbered user turn ("n17") to each request."""
    import httpx

    lat: list[float] = []
    ttfb = TTFB.setdefault(url, [])
    ttfb.clear()
    errors = 0
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        async def worker():
            nonlocal errors
            while not queue.empty():
                i = queue.get_nowait()
                if rate:
                    delay = t0 + i / rate - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                t = time.perf_counter()
                one = body[i % len(body)] if isinstance(body, list) else body
                payload = {**one, "messages": one["messages"] + [{"role": "user", "content": f"n{i}"}]} if tag else one
                if one.get("stream"):
                    async with client.stream("POST", url, json=payload, headers=headers) as r:
                        first = None
                        async for chunk in r.aiter_raw():
                            first = first or time.perf_counter()
                        ttfb.append(((first or time.perf_counter()) - t) * 1000)
                else:
                    r = await client.post(url, json=payload, headers=headers)
                lat.append((time.perf_counter() - t) * 1000)
                errors += r.status_code != 200

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    return lat, wall, errors


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid`, all its threads (Linux /proc; 0.0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p * (len(v) - 1))))]


def added(direct: list[float], via: list[float], resamples: int = 2000) -> str:
    """What going through serve adds at p50 and p95 (via minus direct), each with a 95% bootstrap interval:
    both samples resampled with replacement, independently (they are different requests). Percentiles by nearest
    rank, as `pct` takes them, so the point is the difference of the p95s printed beside it."""
    import numpy as np

    rng = np.random.default_rng(0)
    d, v = np.asarray(direct), np.asarray(via)
    parts = []
    for name, q in (("p50", 50), ("p95", 95)):
        point = pct(via, q / 100) - pct(direct, q / 100)
        boot = (np.percentile(rng.choice(v, (resamples, len(v))), q, axis=1, method="nearest")
                - np.percentile(rng.choice(d, (resamples, len(d))), q, axis=1, method="nearest"))
        lo, hi = np.percentile(boot, [2.5, 97.5])
        parts.append(f"{name} {point:+.2f} ms [{lo:+.2f}, {hi:+.2f}]")
    return "  ".join(parts)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, proc, timeout: float = 120.0) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            proc.stderr.seek(0)
            raise SystemExit(f"{url}: the server exited ({proc.returncode}): {proc.stderr.read().decode(errors='replace')[-2000:]}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def proxy_benchmark(clients: int, total: int, rate: float | None, malformed: float = 0.0, stream: bool = False) -> None:
    """Upstream, proxy and clients in three processes (one Python process each: no shared GIL)."""
    import signal
    import subprocess

    ws = Path(tempfile.mkdtemp()) / "ws"
    up_port, px_port = free_port(), free_port()
    upstream = subprocess.Popen([sys.executable, __file__, "--role", "upstream", "--port", str(up_port), "--malformed", str(malformed)],
                                stdout=subprocess.DEVNULL, stderr=tempfile.TemporaryFile())
    env = {**os.environ, "SLMCONVERT_API_KEYS": "k"}
    proxy = subprocess.Popen([sys.executable, "-m", "slmconvert", "serve", "-w", str(ws), "--mode", "proxy", "--port", str(px_port),
                              "--upstream", f"http://127.0.0.1:{up_port}/v1", "--set", f"serve.max_concurrency={max(64, clients)}"],
                             stdout=subprocess.DEVNULL, stderr=tempfile.TemporaryFile(), env=env, cwd=Path(__file__).resolve().parents[1])
    body = {"model": "gpt-4o", "messages": [{"role": "system", "content": "You are the billing agent."},
                                            {"role": "user", "content": "My email is jo@example.com, what do I owe?"}]}
    if stream:
        body["stream"] = True
    try:
        wait_up(f"http://127.0.0.1:{up_port}/health", upstream)
        wait_up(f"http://127.0.0.1:{px_port}/health", proxy)
        direct_url = f"http://127.0.0.1:{up_port}/v1/chat/completions"
        proxy_url = f"http://127.0.0.1:{px_port}/v1/chat/completions"
        auth = {"Authorization": "Bearer k"}
        warm = min(200, total)
        asyncio.run(load(proxy_url, body, clients, warm, auth))
        asyncio.run(load(direct_url, body, clients, warm, {}))
        direct, d_wall, d_err = asyncio.run(load(direct_url, body, clients, total, {}, rate))
        via, p_wall, p_err = asyncio.run(load(proxy_url, body, clients, total, auth, rate))
    finally:
        proxy.send_signal(signal.SIGINT)  # graceful: the call log is drained before exit
        proxy.wait(timeout=300)
        upstream.terminate()
        upstream.wait()
    records = [json.loads(line) for f in (ws / "serve").glob("calls-*.jsonl") for line in open(f)]
    lines, reduced = len(records), sum("unlogged_content" in r for r in records)
    expected = total + warm
    print(f"{clients} concurrent clients, {total} requests each way"
          f"{f' at {rate:g} req/s (open loop)' if rate else ' (closed loop: as fast as they can)'}; upstream, proxy and load generator in separate "
          f"processes on the same {os.cpu_count()} cores (loopback)")
    print(f"  direct to upstream: {total / d_wall:7.0f} req/s  p50 {statistics.median(direct):6.2f} ms  p95 {pct(direct, .95):6.2f} ms  errors {d_err}")
    print(f"  through the proxy:  {total / p_wall:7.0f} req/s  p50 {statistics.median(via):6.2f} ms  p95 {pct(via, .95):6.2f} ms  errors {p_err}")
    print(f"  added by the proxy: {added(direct, via)} (95% bootstrap intervals)")
    if stream:
        d_first, p_first = TTFB[direct_url], TTFB[proxy_url]
        print(f"  streamed: time to first byte direct p50 {statistics.median(d_first):.2f} ms, through the proxy "
              f"p50 {statistics.median(p_first):.2f} ms (p95 {pct(d_first, .95):.2f} / {pct(p_first, .95):.2f} ms)")
    print(f"  call log: {lines} of {expected} requests logged, scrubbed ({expected - lines} lost); "
          f"{malformed:.0%} malformed upstream answers, {reduced} logged in reduced form (content withheld)")


def fake_backend_app(engine_ms: float = 0.0):
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(body: dict):
        if engine_ms:  # the time a real engine spends generating (a 135M model decoding a short answer on a GPU: tens of ms)
            await asyncio.sleep(engine_ms / 1000)
        return {"id": "cmpl-x", "object": "text_completion", "model": body.get("model"),
                "choices": [{"index": 0, "text": "ok", "finish_reason": "stop",
                             "logprobs": {"tokens": ["ok"], "token_logprobs": [-0.01]}}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 1}}

    return app


def backend_benchmark(workspace: str, clients: int, total: int, rate: float | None, engine_ms: float = 0.0,
                      overlap: bool = True, gate_runtime: str = "auto", bodies: int = 20, gate: bool = True,
                      serve_sets: list[str] = (), busy_procs: int = 0, pin: bool = False, rounds: int = 1) -> None:
    """serve (convert mode, external SLM engine) vs the engine alone, separate processes; `rounds` > 1 alternates
    the two in that many blocks each, so a drift of the machine's load falls on both alike."""
    import signal
    import subprocess

    import pyarrow.parquet as pq

    from slmconvert.store import load_invocations
    from slmconvert.workspace import Workspace

    import shutil

    # A copy whose policy lets every site's text answers through (the fake engine answers "ok"): this
    # times the SLM path, whatever the real policy moves. The real workspace is not touched.
    copy = Path(tempfile.mkdtemp()) / "ws"
    shutil.copytree(workspace, copy, ignore=shutil.ignore_patterns("serve"))
    policy_path = copy / "eval" / "policy.json"
    policy = json.loads(policy_path.read_text())
    sites = sorted(policy.get("requests", {}))
    policy["rules"] = {site: {"text": {"action": "slm", "min_confidence": None, "reason": "opened for the benchmark"}} for site in sites}
    for site in sites:
        policy["requests"][site]["min_similarity"] = None
    policy_path.write_text(json.dumps(policy))
    if not gate:  # what the gate costs: the same run without it
        (copy / "eval" / "familiarity.npz").unlink(missing_ok=True)
    workspace = str(copy)
    ws = Workspace(workspace)
    by_id = {i.id: i for i in load_invocations(ws, ws.invocation_stage())}
    test = [by_id[a["invocation_id"]] for a in pq.read_table(ws.stage_dir("cluster") / "assignments.parquet").to_pylist()
            if a["split"] == "test" and a["invocation_id"] in by_id]
    be_port, up_port, sv_port = free_port(), free_port(), free_port()
    # --pin: serve on a core of its own, the engine, upstream and load generator on the others (as when they run
    # on other machines): what serve adds, without its gate's CPU slowing the load generator that measures it
    cores = sorted(os.sched_getaffinity(0))
    if pin and len(cores) < 2:
        raise SystemExit("--pin needs at least 2 cores")
    own, rest = ({cores[-1]}, set(cores[:-1])) if pin else (None, None)
    on = (lambda cpus: (lambda: os.sched_setaffinity(0, cpus))) if pin else (lambda cpus: None)
    if pin:
        os.sched_setaffinity(0, rest)
    backend = subprocess.Popen([sys.executable, __file__, "--role", "backend", "--port", str(be_port), "--engine-ms", str(engine_ms)],
                               stdout=subprocess.DEVNULL, stderr=tempfile.TemporaryFile(), preexec_fn=on(rest))
    upstream = subprocess.Popen([sys.executable, __file__, "--role", "upstream", "--port", str(up_port)],
                                stdout=subprocess.DEVNULL, stderr=tempfile.TemporaryFile(), preexec_fn=on(rest))
    serve = subprocess.Popen([sys.executable, "-m", "slmconvert", "serve", "-w", workspace, "--mode", "convert", "--no-auth",
                              "--port", str(sv_port), "--upstream", f"http://127.0.0.1:{up_port}/v1",
                              "--slm-backend", f"http://127.0.0.1:{be_port}/v1", "--set", f"serve.max_concurrency={max(64, clients)}",
                              "--set", f"serve.gate_overlap={str(overlap).lower()}", "--set", f"serve.gate_runtime={gate_runtime}"]
                             + [arg for kv in serve_sets for arg in ("--set", kv)],
                             stdout=subprocess.DEVNULL, stderr=tempfile.TemporaryFile(), env=dict(os.environ), cwd=Path(__file__).resolve().parents[1],
                             preexec_fn=on(own))
    busy: list = []
    try:
        for url, proc in ((f"http://127.0.0.1:{be_port}/health", backend), (f"http://127.0.0.1:{up_port}/health", upstream),
                          (f"http://127.0.0.1:{sv_port}/health", serve)):
            wait_up(url, proc, timeout=300)
        import httpx

        # Test-split requests the policy lets the SLM answer (the fake engine says "ok": a text answer), as they
        # are: the gate embeds each one's real prompting turn, compaction and rendering see real conversations.
        body, answered, probes = [], set(), 0
        for inv in test:
            probes += 1
            candidate = {"model": "gpt-4o", "messages": inv.request.messages, "tools": inv.request.tools}
            r = httpx.post(f"http://127.0.0.1:{sv_port}/v1/chat/completions", json=candidate, timeout=60)
            if r.headers.get("x-slmconvert-answered-by") == "slm":
                body.append(candidate)
                answered.add(r.headers.get("x-slmconvert-site"))
                if len(body) == bodies:
                    break
        gate_runtime_used = httpx.get(f"http://127.0.0.1:{sv_port}/health", timeout=10).json().get("request_gate")
        if not body:
            raise SystemExit("no test-split request of this workspace is answered by the SLM under its policy "
                             "(the fake engine answers in text): nothing to time on the SLM path")
        direct_body = {"model": "slm", "prompt": "x" * 2000, "max_tokens": 8, "messages": []}
        direct_url = f"http://127.0.0.1:{be_port}/v1/completions"
        serve_url = f"http://127.0.0.1:{sv_port}/v1/chat/completions"
        asyncio.run(load(serve_url, body, clients, min(100, total), {}, tag=False))
        # --busy: processes that want the CPU all the time, at normal priority (an engine on serve's cores, say)
        busy += [subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=on(own)) for _ in range(busy_procs)]
        direct, via, d_err, s_err, cpu_s = [], [], 0, 0, 0.0
        for k in range(rounds):
            n = total // rounds + (k < total % rounds)
            lat, _, err = asyncio.run(load(direct_url, direct_body, clients, n, {}, rate))
            direct, d_err = direct + lat, d_err + err
            before = cpu_seconds(serve.pid)
            lat, _, err = asyncio.run(load(serve_url, body, clients, n, {}, rate, tag=False))
            via, s_err = via + lat, s_err + err
            cpu_s += cpu_seconds(serve.pid) - before
    finally:
        for p in busy:
            p.kill()
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(timeout=120)
        except subprocess.TimeoutExpired:
            serve.kill()
        for p in (backend, upstream, *busy):
            p.terminate()
            p.wait()
    print(f"{clients} concurrent clients, {total} requests each way{f' at {rate:g} req/s (open loop)' if rate else ''}; "
          f"engine, upstream, serve and load generator in separate processes on {os.cpu_count()} cores; "
          f"the engine takes {engine_ms:g} ms per answer; serve.gate_overlap={str(overlap).lower()}; request gate: "
          f"{gate_runtime_used if gate else 'none (--no-gate)'}{''.join(' --set ' + kv for kv in serve_sets)}"
          f"{f'; {busy_procs} busy process(es) beside them' if busy_procs else ''}"
          f"{f'; serve pinned to core {min(own)}, the rest to {sorted(rest)}' if pin else ''}"
          f"{f'; direct and through serve alternated in {rounds} blocks each' if rounds > 1 else ''}")
    print(f"  straight to the SLM engine:   p50 {statistics.median(direct):7.2f} ms  p95 {pct(direct, .95):7.2f} ms  errors {d_err}")
    print(f"  through serve (convert mode): p50 {statistics.median(via):7.2f} ms  p95 {pct(via, .95):7.2f} ms  errors {s_err}")
    records = [json.loads(line) for f in (copy / "serve").glob("calls-*.jsonl") for line in open(f)]
    expected = probes + min(100, total) + total
    print(f"  call log: {len(records)} of {expected} requests logged ({expected - len(records)} lost), "
          f"{sum(r.get('served_by', {}).get('by') == 'slm' for r in records)} answered by the SLM")
    timed = sorted(records, key=lambda r: r.get("timestamp") or "")[expected - total:]  # the probes and warm-up came first
    own_ms = sorted(r["latency_ms"] - r["served_by"]["engine_ms"] for r in timed if "engine_ms" in r.get("served_by", {}))
    if own_ms:
        print(f"  serve's own time per request, from its call log (latency minus the engine call): p50 "
              f"{statistics.median(own_ms):.2f} ms  p95 {pct(own_ms, .95):.2f} ms")
    if cpu_s > 0:
        print(f"  serve's CPU per request while timed: {cpu_s * 1000 / total:.2f} ms (all its threads: request handling, "
              "the gate's embedding, the call log's scrubbing; from /proc)")
    waits = [r["served_by"]["gate_wait_ms"] for r in timed if "gate_wait_ms" in r.get("served_by", {})]
    if waits:
        late = sorted(w for w in waits if w > 0)
        print(f"  request gate: {len(late)} of {len(waits)} timed requests waited for it after the engine answered"
              + (f" (p50 {statistics.median(late):.2f} ms, p95 {pct(late, .95):.2f} ms, max {late[-1]:.2f} ms)" if late else ""))
    print(f"  every timed request was answered by the SLM engine ({len(body)} test-split requests in turn, site(s) "
          f"{', '.join(sorted(answered))}; a copy of the workspace whose policy lets text answers through, so the SLM path is what is timed)")
    print(f"  added by serve: {added(direct, via)} (95% bootstrap intervals; routing embedding, request gate, compaction "
          "and rendering, policy)")


def slm_benchmark(workspace: str, n: int) -> None:
    import httpx
    import pyarrow.parquet as pq

    from slmconvert.config import load_config
    from slmconvert.serve.app import ServeSettings, create_app
    from slmconvert.serve.engine import SlmEngine
    from slmconvert.store import load_invocations
    from slmconvert.workspace import Workspace

    ws = Workspace(workspace)
    cfg = load_config(None, [f"workspace={json.dumps(workspace)}"])
    t = time.perf_counter()
    engine = SlmEngine(cfg, ws, max_new_tokens=128)
    print(f"SLM engine loaded in {time.perf_counter() - t:.1f} s: sites {engine.sites}")
    by_id = {i.id: i for i in load_invocations(ws, ws.invocation_stage())}
    test = [by_id[a["invocation_id"]] for a in pq.read_table(ws.stage_dir("cluster") / "assignments.parquet").to_pylist()
            if a["split"] == "test" and a["invocation_id"] in by_id][:n]
    with Server(fake_upstream_app()) as up, Server(create_app(ServeSettings(upstream=up.url + "/v1", mode="convert", no_auth=True),
                                                              engine=engine)) as srv:
        lat, by = [], {"slm": [], "llm": []}
        for inv in test:
            t = time.perf_counter()
            r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "gpt-4o", "messages": inv.request.messages,
                                                                   "tools": inv.request.tools}, timeout=300)
            ms = (time.perf_counter() - t) * 1000
            lat.append(ms)
            by[r.headers.get("x-slmconvert-answered-by", "llm")].append(ms)
    print(f"convert mode on CPU, {len(lat)} test-split requests one at a time: p50 {statistics.median(lat):.0f} ms, "
          f"p95 {pct(lat, .95):.0f} ms; SLM answered {len(by['slm'])} (p50 {statistics.median(by['slm']) if by['slm'] else 0:.0f} ms), "
          f"LLM {len(by['llm'])} (p50 {statistics.median(by['llm']) if by['llm'] else 0:.0f} ms, includes the SLM attempt)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rate", type=float, default=None, help="total requests/s (open loop); default: as fast as possible")
    ap.add_argument("--malformed", type=float, default=0.0, help="share of upstream answers that are odd (refusal, truncated "
                    "tool arguments, numeric content); the call log must still hold every call")
    ap.add_argument("--stream", action="store_true", help="stream: true requests, the upstream answering in server-sent events")
    ap.add_argument("--slm", default=None, help="a converted workspace (after evaluate) for the SLM-path latency")
    ap.add_argument("--slm-backend", default=None, metavar="WS", help="a converted workspace: serve with an external (fake) SLM engine")
    ap.add_argument("--slm-requests", type=int, default=20)
    ap.add_argument("--engine-ms", type=float, default=0.0, help="with --slm-backend: the fake engine's time per answer (generation)")
    ap.add_argument("--no-overlap", action="store_true", help="with --slm-backend: serve.gate_overlap=false (the gate, then the engine)")
    ap.add_argument("--gate-runtime", choices=["auto", "onnx", "torch"], default="auto", help="with --slm-backend: serve.gate_runtime")
    ap.add_argument("--no-gate", action="store_true", help="with --slm-backend: drop the request gate from the workspace copy (what it costs)")
    ap.add_argument("--serve-set", action="append", default=[], metavar="KEY=VALUE", help="with --slm-backend: a --set for serve (repeatable)")
    ap.add_argument("--busy", type=int, default=0, metavar="N", help="with --slm-backend: N processes spinning on the CPU at "
                    "normal priority while the load runs (an engine sharing serve's cores): does the gate still keep up?")
    ap.add_argument("--pin", action="store_true", help="with --slm-backend: serve on a core of its own, the engine, upstream "
                    "and load generator on the others (--busy spinners on serve's core)")
    ap.add_argument("--rounds", type=int, default=1, help="with --slm-backend: alternate direct and through-serve load in "
                    "this many blocks each (a drift of the machine's load then falls on both)")
    ap.add_argument("--bodies", type=int, default=20, help="with --slm-backend: how many different test-split requests are sent in turn")
    ap.add_argument("--role", choices=["bench", "upstream", "backend"], default="bench", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.role == "upstream":
        import uvicorn

        uvicorn.run(fake_upstream_app(a.malformed), host="127.0.0.1", port=a.port, log_level="error")
    elif a.role == "backend":
        import uvicorn

        uvicorn.run(fake_backend_app(a.engine_ms), host="127.0.0.1", port=a.port, log_level="error")
    elif a.slm_backend:
        backend_benchmark(a.slm_backend, a.clients, a.requests, a.rate, a.engine_ms, not a.no_overlap, a.gate_runtime, a.bodies,
                          not a.no_gate, a.serve_set, a.busy, a.pin, max(1, a.rounds))
    elif a.slm:
        slm_benchmark(a.slm, a.slm_requests)
    else:
        proxy_benchmark(a.clients, a.requests, a.rate, a.malformed, a.stream)


if __name__ == "__main__":
    main()
