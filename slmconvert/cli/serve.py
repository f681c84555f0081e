from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from slmconvert.cli import app
from slmconvert.cli._common import ConfigOpt, SetOpt, WorkspaceOpt, err_console, handle_errors, load


def client_keys(sc) -> list[str]:
    import os

    keys = [k.strip() for k in os.environ.get(sc.api_keys_env, "").split(",") if k.strip()]
    if sc.api_key_file:
        try:
            text = Path(sc.api_key_file).expanduser().read_text(encoding="utf-8")
        except OSError as e:
            from slmconvert.errors import ConfigError

            raise ConfigError("serve.api_key_file", [f"{sc.api_key_file}: {e.strerror}"]) from None
        keys += [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return keys


def idle_policy_note(ws, policy) -> str | None:
    """What to tell a user whose routing policy lets the SLM answer nothing: every call goes to the LLM, and, from
    evaluate's summary, whether its sample could have shown a move at all (the evidence ceiling). None when some kind
    of answer goes to the SLM."""
    from slmconvert.io import read_json

    sites = (policy.doc.get("rules") or {}) if policy is not None else {}
    if policy is not None and any(policy.servable(s) for s in sites):
        return None
    note = ("the routing policy lets the SLM answer nothing: every call goes to the upstream LLM (no kind of SLM answer "
            "reached evaluate.target_agreement on calibration)")
    try:
        ceiling = read_json(ws.stage_dir("evaluate") / "summary.json")["headline"].get("evidence_ceiling") or {}
    except (OSError, ValueError, KeyError, TypeError):
        ceiling = {}
    if ceiling.get("share_calls") is not None and ceiling["share_calls"] < 0.999:
        note += (f"; evaluate's sample could show at most {ceiling['share_calls']:.0%} of calls moving even for an SLM agreeing "
                 f"on every call ({ceiling['share_calls_all_test']:.0%} with every test call)"
                 + (f": {ceiling['advice']}" if ceiling.get("advice") else ""))
    return note


@app.command()
@handle_errors
def serve(
    workspace: Optional[Path] = WorkspaceOpt,
    upstream: Optional[str] = typer.Option(None, "--upstream", help="Upstream LLM base URL (OpenAI-compatible), e.g. https://api.openai.com/v1. Its key: $SLMCONVERT_UPSTREAM_API_KEY."),
    mode: Optional[str] = typer.Option(None, "--mode", help="convert (SLM first, LLM fallback; default) | proxy (pass-through logging proxy)."),
    host: Optional[str] = typer.Option(None, "--host", help="Bind address (default 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, "--port", help="Port (default 8000)."),
    api_key_file: Optional[Path] = typer.Option(None, "--api-key-file", help="Accepted client keys, one per line (or $SLMCONVERT_API_KEYS, comma-separated)."),
    no_auth: bool = typer.Option(False, "--no-auth", help="Accept requests without a client key (explicit opt-out)."),
    slm_backend: Optional[str] = typer.Option(None, "--slm-backend", help="OpenAI-compatible server running the exported SLMs (vLLM, llama-server, Ollama), e.g. http://localhost:8000/v1; default: the SLMs run in this process."),
    slm_backend_sites: Optional[Path] = typer.Option(None, "--slm-backend-sites", help="The export's sites.json (model names, llama.cpp adapter ids)."),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Serve the converted agent: an OpenAI-compatible /v1/chat/completions that answers with the call site's SLM
    where the routing policy evaluate verified allows it (WS/eval/policy.json) and forwards to the upstream LLM otherwise; every call is logged (scrubbed)
    to WS/serve/ for the next `slmconvert run`."""
    import json

    from rich.markup import escape

    extra = []
    for key, value in (("upstream", upstream), ("mode", mode), ("host", host), ("port", port), ("slm_backend", slm_backend),
                       ("slm_backend_sites", str(slm_backend_sites) if slm_backend_sites else None)):
        if value is not None:
            extra.append(f"serve.{key}={json.dumps(value)}")
    if api_key_file:
        extra.append(f"serve.api_key_file={json.dumps(str(api_key_file))}")
    if no_auth:
        extra.append("serve.no_auth=true")
    cfg, ws = load(config, set_, workspace, extra)
    sc = cfg.serve
    from slmconvert.errors import ConfigError

    keys = client_keys(sc)
    if not keys and not sc.no_auth:
        raise ConfigError("serve", [f"client API keys are required: set ${sc.api_keys_env} (comma-separated) or --api-key-file, "
                                    "or pass --no-auth to accept unauthenticated requests"])
    if sc.mode == "proxy" and not sc.upstream:
        raise ConfigError("serve", ["--mode proxy needs --upstream URL"])
    if sc.host not in ("127.0.0.1", "localhost", "::1"):
        err_console.print(f"[yellow]warning:[/] listening on {sc.host}: reachable from other machines", highlight=False)
    if sc.no_auth:
        err_console.print(f"[yellow]warning:[/] --no-auth: anyone who can reach {sc.host}:{sc.port} can spend your upstream LLM "
                          "key and read what the SLMs answer", highlight=False)

    from slmconvert.serve.app import ServeSettings, create_app
    from slmconvert.serve.calllog import CallLogger

    engine = None
    if sc.mode == "convert":
        from slmconvert.serve.engine import SlmEngine

        err_console.print("loading the router and the SLM adapters ...")
        sites = None
        if sc.slm_backend_sites:
            from slmconvert.io import read_json

            sites = read_json(sc.slm_backend_sites)
        engine = SlmEngine(cfg, ws, device=sc.device, max_new_tokens=sc.max_new_tokens or cfg.evaluate.max_new_tokens,
                           backend=sc.slm_backend, backend_sites=sites, backend_timeout_s=sc.slm_backend_timeout_s,
                           batch_size=sc.batch_size, batch_wait_ms=sc.batch_wait_ms, gate_overlap=sc.gate_overlap,
                           backend_grammar=sc.slm_backend_grammar, max_concurrency=sc.max_concurrency,
                           gate_runtime=sc.gate_runtime)
        free = engine.unconstrained_backend_sites()
        if free:
            err_console.print(f"[yellow]warning:[/] the SLM backend decodes {', '.join(free)} without the tool-call grammar the "
                              "routing policy was verified with: invalid calls still go to the LLM, but the SLM may agree with it "
                              "less often than verified. vLLM takes it as --set serve.slm_backend_grammar=structural_tag, llama-server as gbnf "
                              "(or pass the export's sites.json: --slm-backend-sites)", highlight=False)
        if sc.slm_backend and engine.policy.doc.get("tool_choice") == "whole_name":
            err_console.print("[yellow]warning:[/] the routing policy was verified with each call's tool chosen by its whole name's "
                              "probability (evaluate.tool_choice: whole_name); the SLM backend decodes names greedily, so the SLM may "
                              "agree with the LLM less often than verified (evaluate with tool_choice: greedy to verify what it does)",
                              highlight=False)
        if sc.slm_backend and sc.gate_overlap and engine.head is not None:
            err_console.print("[dim]note: the action head picks each call's tool from the request gate's embedding "
                              "(evaluate.tool_choice: head), so for requests with tools at sites with a head the gate embeds before the engine "
                              "generates, not beside it[/]",
                              highlight=False)
        if not sc.upstream:
            err_console.print("[yellow]warning:[/] no --upstream: requests the SLM may not answer get HTTP 502")
        idle = idle_policy_note(ws, engine.policy)
        if idle:
            err_console.print(f"[yellow]note:[/] {escape(idle)}", highlight=False)
    logger = CallLogger(ws, cfg) if sc.log_calls else None
    settings = ServeSettings(upstream=sc.upstream, mode=sc.mode, api_keys=keys, no_auth=sc.no_auth,
                             upstream_key_env=sc.upstream_key_env, max_body_bytes=sc.max_body_bytes,
                             max_concurrency=sc.max_concurrency, queue_timeout_s=sc.queue_timeout_s,
                             upstream_timeout_s=sc.upstream_timeout_s)
    application = create_app(settings, engine=engine, logger=logger)
    import uvicorn

    err_console.print(f"slmconvert serve ({sc.mode}) on http://{sc.host}:{sc.port}/v1 — sites: "
                      f"{', '.join(engine.sites) if engine else 'all forwarded'}; logging to {ws.root / 'serve'}"
                      + (f"; request gate: {escape(engine.gate_runtime)}" if engine is not None and engine.gate_runtime else ""), highlight=False)
    try:
        uvicorn.run(application, host=sc.host, port=sc.port, log_level="warning")
    finally:
        if logger is not None:
            logger.close()
