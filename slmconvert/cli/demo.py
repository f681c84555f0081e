from __future__ import annotations

from pathlib import Path

import typer

from slmconvert.cli import app
from slmconvert.cli._common import console, handle_errors


@app.command("demo-data")
@handle_errors
def demo_data(
    out: Path = typer.Argument(Path("demo-data/agent_logs.jsonl"), help="Output JSONL file."),
    sessions: int = typer.Option(120, "--sessions", "-n", min=2, help="Conversations to generate."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same file)."),
    format: str = typer.Option("request-response", "--format", help="request-response (one call per line), trajectory (one conversation per line), shapes (one object per agent: policy stored once, nested histories, a user's own tool calls, text actions, client ids), or the same calls as another tool logs them: anthropic, responses (request/response bodies), otel (OTLP JSON spans), langfuse, litellm, langsmith."),
) -> None:
    """Write a seeded synthetic log of a multi-agent application (3 call sites, fake PII) to try slmconvert on."""
    from slmconvert.demo import generate
    from slmconvert.demo.generator import FORMATS
    from slmconvert.errors import SlmconvertError

    if format not in FORMATS:
        raise SlmconvertError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    stats = generate(out, sessions=sessions, seed=seed, fmt=format)
    console.print(f"wrote {stats['records']} records ({stats['calls']} LLM calls, {stats['sessions']} sessions) to {out}", highlight=False)
