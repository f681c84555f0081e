"""Session partitions: the unit that `collect` deduplicates, scrubs and writes, on either engine.

Every parsed call goes to partition `hash(session) mod P`, where P = ceil(MB to read /
collect.partition_mb). A session therefore lies whole in one partition, whichever file, line or
Ray worker its calls came from, so the scrubber sees all of it: a value detected in one call is
replaced in every call of the session, and placeholders are numbered in the session's order. Each
partition is scrubbed on its own (a fresh scrubber; template values from earlier runs known, those
it learns stored for the next run), which is what lets Ray scrub partitions in parallel and still
write the very workspace the local engine writes.

`local` holds one partition at a time in memory: with more than one, parsed calls wait in spill
files (a private temporary folder outside the workspace, removed when the run ends; they hold
unscrubbed text, like Ray's object store does on the other engine).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmconvert.collect.tools import toolset_key
from slmconvert.invocation import Invocation
from slmconvert.progress import NULL_PROGRESS, Progress

MB = 1 << 20


def n_partitions(bytes_to_read: int, partition_mb: float) -> int:
    return max(1, math.ceil(bytes_to_read / (partition_mb * MB)))


def partition_of(session_id: str, n: int) -> int:
    """Stable across processes, machines and Python versions (not `hash()`)."""
    if n == 1:
        return 0
    return int.from_bytes(hashlib.blake2b(session_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big") % n


@dataclass
class PartitionResult:
    index: int
    calls: list[Invocation]  # new, scrubbed (when scrubbing is on), in read order
    toolsets: dict[str, str]  # call id -> tool-set key, for calls whose tools are inferred
    report: dict | None = None
    duplicates: int = 0
    scrub_dropped: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    written: list[str] | None = None  # shards a Ray worker already wrote (then `calls` is empty)
    n_written: int = 0


def write_partition(stage_dir: Path, result: PartitionResult, known_mids: set[str] | frozenset[str], first_shard: int,
                    tools_from_file: bool) -> list[str]:
    """Partition p as shard `first_shard + p`, its messages deduplicated against earlier runs only: the same
    files whichever process writes them, in whichever order."""
    from slmconvert.store import write_shards

    for inv in result.calls:
        if inv.id in result.toolsets:
            inv.request.tools_source = "file" if tools_from_file else "inferred"
    if not result.calls:
        return []
    return write_shards(stage_dir, result.calls, result.toolsets, known_mids, first_shard + result.index, remember=False)


def scrubber_factory(scrub_config, key: bytes | None, n_process: int) -> Callable[[], Any] | None:
    """A fresh scrubber per partition (spaCy itself is loaded once per process); None when scrubbing is off."""
    if not scrub_config.enabled:
        return None
    from slmconvert.scrub.engine import Scrubber
    from slmconvert.scrub.policy import load_policy

    policy, sc = load_policy(scrub_config.policy), scrub_config
    return lambda: Scrubber(policy, key, sc.surrogates, sc.batch_size, n_process)


def process_partition(index: int, calls: list[Invocation], known_ids: set[str] | frozenset[str], scrub_config,
                      make_scrubber: Callable[[], Any] | None, template_values: Iterable[str] = (),
                      progress: Progress = NULL_PROGRESS) -> PartitionResult:
    """Deduplicate (against the workspace and within the partition), scrub, key inferred tool sets.

    The same code runs in the local engine and in a Ray scrub worker."""
    t0 = time.perf_counter()
    seen: set[str] = set()
    fresh, duplicates = [], 0
    for inv in calls:
        if inv.id in known_ids or inv.id in seen:
            duplicates += 1
            continue
        seen.add(inv.id)
        fresh.append(inv)
    seconds = {"dedup_s": time.perf_counter() - t0}
    report, dropped = None, 0
    if make_scrubber is not None and fresh:
        from slmconvert.scrub import scrub_invocations

        t1 = time.perf_counter()
        n_before = len(fresh)
        fresh, report = scrub_invocations(fresh, scrub_config, None, scrubber=make_scrubber(), template_values=template_values,
                                           progress=progress)
        dropped = n_before - len(fresh)
        seconds["scrub_s"] = time.perf_counter() - t1
    toolsets = {inv.id: toolset_key(inv.request.messages, inv.agent) for inv in fresh if inv.request.tools is None}
    return PartitionResult(index, fresh, toolsets, report, duplicates, dropped, seconds)


class Spill:
    """The local engine's partitions: in memory when there is one, else one JSONL spill file each."""

    def __init__(self, n: int):
        self.n = n
        self.memory: list[Invocation] = []
        self.dir: Path | None = None
        self.handles: list[Any] = []
        self.counts = [0] * n
        if n > 1:
            self.dir = Path(tempfile.mkdtemp(prefix="slmconvert-partitions-"))  # mode 0700
            self.handles = [open(self.dir / f"p{i:05d}.jsonl", "w", encoding="utf-8") for i in range(n)]

    def add(self, batch: list[Invocation]) -> None:
        if self.n == 1:
            self.memory.extend(batch)
            return
        for inv in batch:
            p = partition_of(inv.session_id, self.n)
            self.handles[p].write(json.dumps(inv.to_dict(), ensure_ascii=False) + "\n")
            self.counts[p] += 1

    def partitions(self) -> Iterator[tuple[int, list[Invocation]]]:
        """Each partition's calls in read order, one partition in memory at a time."""
        if self.n == 1:
            calls, self.memory = self.memory, []
            yield 0, calls
            return
        for h in self.handles:
            h.close()
        for p in range(self.n):
            path = self.dir / f"p{p:05d}.jsonl"
            with open(path, encoding="utf-8") as f:
                calls = [Invocation.from_dict(json.loads(line)) for line in f]
            os.unlink(path)
            yield p, calls

    def close(self) -> None:
        for h in self.handles:
            if not h.closed:
                h.close()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class ParsedCalls:
    """What an engine's parsing hands the collect stage: the parse summary (`collector`: quarantine and counts,
    complete before any partition is scrubbed, so `--strict` can refuse before anything is written), the file
    records, and the partitions to deduplicate, scrub and write, in any order. `close()` releases what parsing
    holds (the local spill files, Ray's pipeline), whether or not the partitions were used."""

    collector: Any
    inputs: dict[str, dict[str, Any]]
    results: Iterator[PartitionResult]
    release: Callable[[], None] | None = None

    def close(self) -> None:
        close = getattr(self.results, "close", None)
        if close is not None:
            close()
        if self.release is not None:
            self.release()
