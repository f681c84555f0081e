"""Invocations on disk: Parquet shards written through `datasets`, prompts stored once.

Calls of one conversation share their prefix (the k-th call's prompt holds the k-1 calls
before it), so a prompt is stored as a list of message ids and each distinct message is
stored once in the messages shards. Repeated values (a tool inventory, a params dict) are
dictionary-encoded by Parquet. `load_invocations` rebuilds full Invocation objects.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from slmconvert.invocation import Invocation, Request, Response, Source, ToolCall, Usage, message_id
from slmconvert.io import write_parquet_atomic
from slmconvert.errors import StageError
from slmconvert.workspace import STAGE_DIRS, Manifest, Workspace

INVOCATION_SHARD = "invocations-{:05d}.parquet"
MESSAGE_SHARD = "messages-{:05d}.parquet"
SHARD_PATTERNS = ("invocations-*.parquet", "messages-*.parquet")
TOOLS_FILE = "tools.json"


def _features():
    from datasets import Features, Sequence, Value

    s = Value("string")
    return Features(
        {
            "id": s,
            "source_format": s,
            "source_path": s,
            "source_locator": s,
            "agent": s,
            "session_id": s,
            "step": Value("int64"),
            "timestamp": s,
            "model": s,
            "message_ids": Sequence(s),
            "tools": s,
            "toolset": s,
            "tools_source": s,
            "params": s,
            "response_content": s,
            "response_tool_calls": s,
            "n_tool_calls": Value("int32"),
            "finish_reason": s,
            "prompt_tokens": Value("int64"),
            "completion_tokens": Value("int64"),
            "latency_ms": Value("float64"),
            "cost_usd": Value("float64"),
            "hci": Value("bool"),
            "meta": s,
        }
    )


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def invocation_row(inv: Invocation, message_ids: list[str], toolset: str | None) -> dict[str, Any]:
    logged_tools = inv.request.tools if inv.request.tools_source == "logged" else None
    return {
        "id": inv.id,
        "source_format": inv.source.format,
        "source_path": inv.source.path,
        "source_locator": inv.source.locator,
        "agent": inv.agent,
        "session_id": inv.session_id,
        "step": inv.step,
        "timestamp": inv.timestamp,
        "model": inv.model,
        "message_ids": message_ids,
        "tools": _dumps(logged_tools) if logged_tools is not None else None,
        "toolset": toolset,
        "tools_source": inv.request.tools_source,
        "params": _dumps(inv.request.params or {}),
        "response_content": inv.response.content,
        "response_tool_calls": _dumps([{"id": c.id, "name": c.name, "arguments": c.arguments} for c in inv.response.tool_calls]),
        "n_tool_calls": len(inv.response.tool_calls),
        "finish_reason": inv.response.finish_reason,
        "prompt_tokens": inv.usage.prompt_tokens if inv.usage else None,
        "completion_tokens": inv.usage.completion_tokens if inv.usage else None,
        "latency_ms": inv.latency_ms,
        "cost_usd": inv.cost_usd,
        "hci": inv.hci,
        "meta": _dumps(inv.meta or {}),
    }


def _write_parquet(path: Path, rows: dict[str, list], features=None) -> None:
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()  # our own progress display is the only one
    write_parquet_atomic(path, Dataset.from_dict(rows, features=features).data.table)


def _columns(rows: list[dict[str, Any]], names: Iterable[str]) -> dict[str, list]:
    return {n: [r[n] for r in rows] for n in names}


def write_shards(
    stage_dir: Path,
    invocations: list[Invocation],
    toolsets: dict[str, str | None],
    known_message_ids: set[str],
    shard_no: int,
    remember: bool = True,
) -> list[str]:
    """Write one invocations shard and one messages shard (new messages only). Returns file names.

    `toolsets` maps invocation id -> key into tools.json (for inferred or user-supplied tools).
    `known_message_ids` is updated in place with the messages written (unless `remember` is off: shards
    written in any order then hold the same messages).
    """
    rows, new_messages = [], {}
    for inv in invocations:
        ids = []
        for msg in inv.request.messages:
            mid = message_id(msg)
            ids.append(mid)
            if mid not in known_message_ids and mid not in new_messages:
                new_messages[mid] = _dumps(msg)
        rows.append(invocation_row(inv, ids, toolsets.get(inv.id)))
    files = []
    if rows:
        name = INVOCATION_SHARD.format(shard_no)
        _write_parquet(stage_dir / name, _columns(rows, _features().keys()), _features())
        files.append(name)
    if new_messages:
        from datasets import Features, Value

        name = MESSAGE_SHARD.format(shard_no)
        _write_parquet(
            stage_dir / name,
            {"id": list(new_messages), "message": list(new_messages.values())},
            Features({"id": Value("string"), "message": Value("string")}),
        )
        files.append(name)
    if remember:
        known_message_ids.update(new_messages)
    return files


def next_shard_no(manifest: Manifest | None) -> int:
    nums = [int(f.split("-")[1].split(".")[0]) for f in (manifest.files if manifest else []) if f.endswith(".parquet")]
    return max(nums, default=-1) + 1


def read_table(stage_dir: Path, files: list[str], prefix: str):
    """The listed shards with this prefix as one `datasets.Dataset` (in memory, no HF cache)."""
    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import InMemoryTable

    tables = [_read_shard(stage_dir / f) for f in files if f.startswith(prefix)]
    if not tables:
        return None
    table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    return Dataset(InMemoryTable(table))


def _read_shard(path: Path):
    """One Parquet shard; a damaged or missing one is a StageError naming the command that rebuilds it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        stage = {v: k for k, v in STAGE_DIRS.items()}.get(path.parent.name, "collect")
        why = "missing" if not path.exists() else f"damaged: {str(e).splitlines()[0][:160]}"
        raise StageError(f"{path} is {why}; rebuild it with `slmconvert {stage} --workspace {path.parent.parent} --force`") from None


def load_tools(stage_dir: Path) -> dict[str, list[dict]]:
    p = stage_dir / TOOLS_FILE
    return json.loads(p.read_text(encoding="utf-8")) if p.exists() else {}


def row_to_invocation(row: dict[str, Any], messages: dict[str, dict], toolsets: dict[str, list[dict]]) -> Invocation:
    tools = json.loads(row["tools"]) if row["tools"] else None
    if tools is None and row["toolset"]:
        tools = toolsets.get(row["toolset"])
    usage = None
    if row["prompt_tokens"] is not None or row["completion_tokens"] is not None:
        usage = Usage(row["prompt_tokens"], row["completion_tokens"])
    return Invocation(
        id=row["id"],
        source=Source(row["source_format"], row["source_path"], row["source_locator"]),
        session_id=row["session_id"],
        step=row["step"],
        request=Request(
            messages=[messages[m] for m in row["message_ids"]],
            tools=tools,
            params=json.loads(row["params"]) if row["params"] else {},
            tools_source=row["tools_source"],
        ),
        response=Response(
            content=row["response_content"],
            tool_calls=[ToolCall(**c) for c in json.loads(row["response_tool_calls"] or "[]")],
            finish_reason=row["finish_reason"],
        ),
        agent=row["agent"],
        timestamp=row["timestamp"],
        model=row["model"],
        usage=usage,
        latency_ms=row["latency_ms"],
        cost_usd=row["cost_usd"],
        hci=bool(row["hci"]),
        meta=json.loads(row["meta"]) if row["meta"] else {},
    )


def load_invocations(workspace: Workspace, stage: str | None = None) -> list[Invocation]:
    """All invocations of a stage (default: the scrubbed ones when `scrub` ran, else `collect`'s)."""
    stage = stage or workspace.invocation_stage()
    manifest = workspace.require_manifest(stage, "loading invocations")
    d = workspace.stage_dir(stage)
    inv_ds = read_table(d, manifest.files, "invocations-")
    if inv_ds is None:
        return []
    msg_ds = read_table(d, manifest.files, "messages-")
    messages = {}
    if msg_ds is not None:
        for mid, text in zip(msg_ds["id"], msg_ds["message"]):
            messages[mid] = json.loads(text)
    toolsets = load_tools(d)
    return [row_to_invocation(row, messages, toolsets) for row in inv_ds.data.table.to_pylist()]
