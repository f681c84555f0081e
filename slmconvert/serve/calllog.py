"""Every served call, SLM or LLM, appended to the workspace in collect's request-response format.

Records are scrubbed (the workspace's scrub policy and key, so surrogates match what `collect`
produced for the same session) by a writer thread, off the request path, then appended to
WS/serve/calls-YYYY-MM-DD.jsonl one line at a time, flushed and fsynced. Nothing unscrubbed is
ever written; a torn last line after a crash is skipped by `collect`. Point `collect.paths` at
WS/serve/ and the next `slmconvert run` learns from live traffic (paper step S6).
"""

from __future__ import annotations

import json
import os
import queue
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from slmconvert.workspace import Workspace

SERVE_DIR = "serve"


class CallLogger:
    def __init__(self, workspace: Workspace, config, *, scrub: bool | None = None):
        self.workspace = workspace
        self.config = config
        self.folder = workspace.root / SERVE_DIR
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.scrub = config.scrub.enabled if scrub is None else scrub
        self._scrubber = None
        self._template_values: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        self.written = 0
        self.failed = 0  # records that could not be written at all (kept for /health; 0 unless the disk fails)
        self.reduced = 0  # records logged without their content (they could not be scrubbed)
        self._session_key: bytes | None = None
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="slmconvert-call-log", daemon=True)
        self._thread.start()

    # -- producer side (request handlers)
    def log(self, record: dict[str, Any]) -> None:
        if record.get("session_id") is not None:
            record = {**record, "session_id": self.session_pseudonym(record["session_id"])}
        self._queue.put(record)

    def flush(self) -> None:
        """Block until every record handed in so far is on disk."""
        self._queue.join()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def path_for(self, when: datetime) -> Path:
        return self.folder / f"calls-{when:%Y-%m-%d}.jsonl"

    # -- writer thread
    def _run(self) -> None:
        """Scrub and append in batches: whatever has queued up while the last batch was written goes
        in one scrub pass (repeated texts — system prompts, tool schemas — are detected once)."""
        while True:
            batch = [self._queue.get()]
            while len(batch) < 256:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(r is None for r in batch)
            records = [r for r in batch if r is not None]
            try:
                if records:
                    self._write(records)
            except OSError as e:  # the disk, not the data: counted, and the server keeps serving
                self.failed += len(records)
                self.last_error = f"{type(e).__name__}: {e}"[:300]
            finally:
                for _ in batch:
                    self._queue.task_done()
            if stop:
                return

    def _write(self, records: list[dict[str, Any]]) -> None:
        """Every call gets a line. A record that cannot be read as a chat call (an upstream refusal
        with no content, truncated tool-call JSON) or scrubbed is logged in a reduced form (who
        answered, when, why not; no content, which might be raw PII) and counted in `reduced`;
        it never costs the other records of its batch."""
        lines: list[str | None] = [None] * len(records)
        parsed: list[tuple[int, Any]] = []
        for k, record in enumerate(records):
            try:
                parsed.append((k, self._parse(record, k)))
            except Exception as e:  # noqa: BLE001 - any record shape a client or upstream can send
                lines[k] = self._reduce(record, e)
        try:
            for k, out in zip([k for k, _ in parsed], self._prepare(parsed, records)):
                lines[k] = self._dumps(out)
        except Exception:  # noqa: BLE001 - the scrubber failed on the batch: find the record(s) at fault
            for k, inv in parsed:
                try:
                    [out] = self._prepare([(k, inv)], records)
                    lines[k] = self._dumps(out)
                except Exception as e:  # noqa: BLE001
                    lines[k] = self._reduce(records[k], e)
        path = self.path_for(datetime.now(timezone.utc))
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)  # call logs hold prompts: owner only
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
        self.written += len(lines)

    def _reduce(self, record: dict[str, Any], error: BaseException) -> str:
        self.reduced += 1
        self.last_error = f"{type(error).__name__}: {error}"[:300]
        return self._dumps(self._reduced(record, error))

    @staticmethod
    def _dumps(record: dict[str, Any]) -> str:
        return json.dumps(record, ensure_ascii=False, default=str)

    @staticmethod
    def _reduced(record: dict[str, Any], error: BaseException) -> dict[str, Any]:
        out = {k: record.get(k) for k in ("timestamp", "session_id", "latency_ms", "served_by", "usage") if k in record}
        out["unlogged_content"] = f"could not be scrubbed ({type(error).__name__}); content withheld"
        return out

    def session_pseudonym(self, session: Any) -> str:
        """The client's session id (an `x-session-id` header may carry an e-mail or a name) as a keyed
        hash: calls of one session still group together, nothing of the value is stored."""
        if not self.scrub:
            return str(session)
        import hashlib
        import hmac

        from slmconvert.scrub.engine import scrub_key

        if self._session_key is None:
            self._session_key = scrub_key(self.workspace, self.config.scrub.seed)
        return "s-" + hmac.new(self._session_key, str(session).encode("utf-8", "replace"), hashlib.sha256).hexdigest()[:20]

    def _parse(self, record: dict[str, Any], k: int):
        """The call as an Invocation (what the scrubber works on); raises on a record collect could not read."""
        if not self.scrub:
            return None
        from slmconvert.collect.formats import ParseContext, RequestResponseFormat

        [inv] = RequestResponseFormat().parse(record, ParseContext(path="serve", locator=f"live {k}", format="request-response"))
        return inv

    def _prepare(self, parsed: list[tuple[int, Any]], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The scrubbed records of `parsed` ((index into records, invocation)), in order, scrubbed in one pass."""
        if not self.scrub:
            return [records[k] for k, _ in parsed]
        from slmconvert.scrub import scrub_invocations

        if self._scrubber is None:
            self._init_scrubber()
        out, _ = scrub_invocations([inv for _, inv in parsed], self.config.scrub, self.workspace, scrubber=self._scrubber,
                                   template_values=self._template_values)
        kept = {inv.source.locator: inv for inv in out}
        return [to_record(kept[inv.source.locator], records[k]) if inv.source.locator in kept
                else {"dropped": "scrub policy", "timestamp": records[k].get("timestamp")}
                for k, inv in parsed]

    def _init_scrubber(self) -> None:
        from slmconvert.io import read_json
        from slmconvert.scrub.engine import Scrubber, scrub_key
        from slmconvert.scrub.policy import load_policy

        sc = self.config.scrub
        self._scrubber = Scrubber(load_policy(sc.policy), scrub_key(self.workspace, sc.seed), sc.surrogates, sc.batch_size, 1)
        report = self.workspace.stage_dir("collect") / "scrub_report.json"
        if report.exists():
            self._template_values = read_json(report).get("template_values_kept", [])


def to_record(inv, original: dict[str, Any]) -> dict[str, Any]:
    """An Invocation back into the request-response format, with the served call's metadata."""
    from slmconvert.chat import response_message

    def wire(m: dict[str, Any]) -> dict[str, Any]:
        """Tool-call arguments back to JSON strings, as the chat-completions API carries them."""
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [{**tc, "function": {**tc["function"], "arguments": json.dumps(tc["function"]["arguments"], ensure_ascii=False)}}
                               for tc in m["tool_calls"]]
        return m

    msg = wire(response_message(inv.response))
    if not msg.get("tool_calls"):
        msg.pop("tool_calls", None)
    messages = [wire(m) for m in inv.request.messages]
    request = {"model": original.get("request", {}).get("model"), "messages": messages, **inv.request.params}
    if inv.request.tools:
        request["tools"] = inv.request.tools
    out = {"timestamp": original.get("timestamp"), "request": request,
           "response": {"model": inv.model, "choices": [{"index": 0, "message": msg, "finish_reason": inv.response.finish_reason}]},
           "latency_ms": original.get("latency_ms"), "served_by": original.get("served_by")}
    if original.get("session_id"):
        out["session_id"] = original["session_id"]  # already a pseudonym when scrubbing (see CallLogger.log)
    if inv.usage:
        out["usage"] = {"prompt_tokens": inv.usage.prompt_tokens, "completion_tokens": inv.usage.completion_tokens}
    return out
