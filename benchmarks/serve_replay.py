"""Does `serve` do what `evaluate` promised? Replay held-out calls through a running `slmconvert serve`.

    python benchmarks/serve_replay.py WS LOG [--config PIPELINE.yaml] [--set KEY=VALUE ...] [--limit N]

WS is an evaluated workspace, LOG the agent log it was built from (read again, unscrubbed, the way
`collect` reads it with the same config). The calls replayed are every call of the *verification*
sessions — the held-out sessions `evaluate` measured its routing policy on and fitted nothing on
(same seeded split; calls its sample left out included). A local fake upstream answers each request
with the LLM response logged for it; `slmconvert serve --mode convert` runs in front of it as users
run it (a subprocess, call logging off). For each call: who answered (the `x-slmconvert-answered-by`
header) and, when the SLM did, whether its answer agrees with the logged one (evaluate's rule: the
same tool call with BFCL-equivalent arguments, or a text reply with embedding similarity >=
`evaluate.text_similarity_at`).

Prints the share the SLM answered and the agreement of those answers, with exact 95% intervals,
beside what summary.json promised (the headline's traffic-weighted share and agreement and their
intervals), and whether each replayed figure lies inside the promised interval.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def _key(messages) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _openai_message(response) -> dict:
    msg = {"role": "assistant", "content": response.content}
    if response.tool_calls:
        msg["tool_calls"] = [{"id": f"call_{i}", "type": "function",
                              "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
                             for i, c in enumerate(response.tool_calls)]
    return msg


class FakeUpstream:
    """Answers a chat completion with the LLM response logged for the same messages."""

    def __init__(self, answers: dict[str, dict]):
        self.answers = answers
        self.missing = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
                msg = outer.answers.get(_key(body.get("messages")))
                if msg is None:
                    outer.missing += 1
                    out, code = {"error": {"message": "no logged answer for this request"}}, 404
                else:
                    out, code = {"id": "chatcmpl-logged", "object": "chat.completion", "created": 0, "model": "logged",
                                 "choices": [{"index": 0, "message": msg, "finish_reason": "stop"}]}, 200
                data = json.dumps(out).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", _free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workspace")
    ap.add_argument("log")
    ap.add_argument("--config", default=None, help="the pipeline YAML the workspace was built with")
    ap.add_argument("--set", action="append", default=[], dest="sets")
    ap.add_argument("--limit", type=int, default=None, help="replay at most N calls (seeded), for a quick look")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for serve to load its models")
    args = ap.parse_args()

    import httpx

    from slmconvert.cluster.stage import load_assignments
    from slmconvert.collect.stage import run as collect
    from slmconvert.config import load_config
    from slmconvert.evaluate.scoring import ALL_METRICS, add_text_similarity, mark_acceptable
    from slmconvert.evaluate.stage import load_summary
    from slmconvert.invocation import normalize_message, response_from_message
    from slmconvert.metrics import Prediction, score
    from slmconvert.policy import clopper_pearson, split_sessions
    from slmconvert.progress import NULL_PROGRESS
    from slmconvert.store import load_invocations
    from slmconvert.workspace import Workspace

    ws_path = str(Path(args.workspace).resolve())
    cfg = load_config(args.config, args.sets + [f"workspace={json.dumps(ws_path)}"])
    ws = Workspace(cfg.workspace)
    summary = load_summary(ws)
    policy = json.loads((ws.stage_dir("evaluate") / "policy.json").read_text())
    seed = policy["split"]["seed"]

    # the held-out sessions evaluate verified on: test split, odd seeded hash (what split_sessions calls verification)
    assignments = {a["invocation_id"]: a for a in load_assignments(ws)}
    test_sessions = {a["session"] for a in assignments.values() if a["split"] == "test"}
    _, verification = split_sessions(test_sessions, seed)
    site_of = {}
    for inv in load_invocations(ws):
        a = assignments.get(inv.id)
        if a is not None and inv.session_id in verification:
            site_of[(inv.session_id, inv.step)] = (a["site"], a["task"])

    # the raw log, read as collect reads it, unscrubbed, into a scratch workspace
    tmp = Path(tempfile.mkdtemp(prefix="replay-"))
    raw_cfg = load_config(args.config, args.sets + [f"workspace={json.dumps(str(tmp / 'ws'))}",
                                                     f"collect.paths={json.dumps([str(Path(args.log).resolve())])}",
                                                     "scrub.enabled=false"])
    collect(raw_cfg, Workspace(raw_cfg.workspace))
    raw = [i for i in load_invocations(Workspace(raw_cfg.workspace), "collect") if (i.session_id, i.step) in site_of]
    if not raw:
        sys.exit("no call of the verification sessions was found in LOG: is it the log this workspace was built from?")
    raw.sort(key=lambda i: (i.session_id, i.step))
    if args.limit and len(raw) > args.limit:
        import random

        raw = sorted(random.Random(0).sample(raw, args.limit), key=lambda i: (i.session_id, i.step))

    upstream = FakeUpstream({_key(i.request.messages): _openai_message(i.response) for i in raw})
    port = _free_port()
    cmd = [sys.executable, "-m", "slmconvert", "serve", "--mode", "convert", "--upstream", upstream.url, "--no-auth",
           "--port", str(port), "-w", ws_path, "--set", "serve.log_calls=false"]
    if args.config:
        cmd += ["--config", args.config]
    for s in args.sets:
        cmd += ["--set", s]
    log = open(tmp / "serve.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    try:
        while True:
            if proc.poll() is not None:
                sys.exit(f"serve exited ({proc.returncode}):\n" + (tmp / "serve.log").read_text()[-3000:])
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() - t0 > args.timeout:
                sys.exit("serve did not come up in time:\n" + (tmp / "serve.log").read_text()[-3000:])
            time.sleep(1)
        load_s = time.time() - t0
        rows, by, reasons, t1 = [], [], {}, time.time()
        for inv in raw:
            body = {"model": "replay", "messages": inv.request.messages}
            if inv.request.tools:
                body["tools"] = inv.request.tools
            r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
            who = r.headers.get("x-slmconvert-answered-by", "error")
            site, task = site_of[(inv.session_id, inv.step)]
            by.append((site, who))
            if who != "slm":
                why = r.headers.get("x-slmconvert-reason", f"HTTP {r.status_code}").split(":")[0][:60]
                reasons[why] = reasons.get(why, 0) + 1
                continue
            msg = r.json()["choices"][0]["message"]
            resp = response_from_message(normalize_message(msg, "serve's answer"))
            text = msg.get("content") or ""
            m = score(inv.response, Prediction(resp, True, text), inv.request.tools, ALL_METRICS)
            rows.append({"site": site, "task": task, "kind": "tool" if inv.response.tool_calls else "text",
                         "expected": inv.response.content or "", "prediction": text, "predicted_call": bool(resp.tool_calls),
                         "embedding_similarity": None, "judge": None, **m})
        replay_s = time.time() - t1
    finally:
        proc.terminate()
        proc.wait(30)
    add_text_similarity(rows, cfg, Workspace(tmp / "score"), progress=NULL_PROGRESS)
    mark_acceptable(rows, cfg.evaluate)

    level = summary["policy"]["confidence_level"]
    n, k, agree = len(by), sum(w == "slm" for _, w in by), sum(r["acceptable"] for r in rows)
    share_iv = clopper_pearson(k, n, level)
    agree_iv = clopper_pearson(agree, k, level)
    h = summary["headline"]

    def inside(x, iv):
        return None if x is None or iv is None else bool(iv[0] - 1e-9 <= x <= iv[1] + 1e-9)

    result = {
        "workspace": ws_path, "log": str(args.log),
        "replayed": {"calls": n, "sessions": len({i.session_id for i in raw}), "slm_answered": k,
                     "share_slm": round(k / n, 4) if n else None, "share_interval": [round(x, 4) for x in share_iv],
                     "agree": agree, "agreement": round(agree / k, 4) if k else None,
                     "agreement_interval": [round(x, 4) for x in agree_iv] if k else None,
                     "upstream_unmatched": upstream.missing, "llm_because": reasons,
                     "seconds": {"serve_load": round(load_s, 1), "replay": round(replay_s, 1)}},
        "promised": {"share_calls": h["share_calls"], "share_calls_interval": h["share_calls_interval"],
                     "agreement": h["agreement"], "agreement_interval": h["agreement_interval"], "measured_on": h["measured_on"]},
    }
    result["match"] = {
        "replayed_share_in_promised_interval": inside(result["replayed"]["share_slm"], h["share_calls_interval"]),
        "promised_share_in_replayed_interval": inside(h["share_calls"], result["replayed"]["share_interval"]),
        "replayed_agreement_in_promised_interval": inside(result["replayed"]["agreement"], h["agreement_interval"]),
        "promised_agreement_in_replayed_interval": inside(h["agreement"], result["replayed"]["agreement_interval"]),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
