"""`engine: ray`: collect and embedding as Ray Data pipelines, writing the workspace `local` writes.

collect:
    files ─ split (JSONL in byte ranges at line ends, with their line numbers; other files whole)
          ─ flat_map(parse)           every task parses its pieces with the same readers as `local`,
                                      drops calls the workspace already holds, tags each call with
                                      its session partition and its place in read order
          ─ groupby(partition)        a session lies whole in one partition (see collect/partitions.py)
          ─ map_groups(ScrubWorker)   an actor pool: Presidio and spaCy loaded once per worker; each
                                      partition deduplicated and scrubbed in read order, as `local` does
          ─ driver                    shards written in partition order, tools inferred, reports merged
embedding:
    the texts the cache lacks, in the order and chunks `local` uses ─ map_batches(EmbedWorker) ─ driver

Surrogates stay consistent per session because partitions are by session; they are also keyed by the
workspace's secret and the value alone (HMAC), so no table is shared between workers. The secret travels
to the workers in the task arguments, never to disk.

Ray is optional (`pip install 'slmconvert[ray]'`); without it `engine: ray` says so in one line.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slmconvert.errors import StageError

if TYPE_CHECKING:
    from slmconvert.collect.partitions import ParsedCalls

INSTALL = "engine: ray needs Ray Data, which is not installed: pip install 'slmconvert[ray]' (or: pip install 'ray[data]>=2.40')"
SEQ_BITS = 32  # seq = chunk index << 32 | call index within the chunk: read order across all chunks


def require_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise StageError(INSTALL) from None
    return ray


def ensure_ray(config) -> int:
    """Connect to (or start) Ray once per process; returns the CPUs the cluster has."""
    ray = require_ray()
    rc = config.ray
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        if rc.address:
            _check_reachable(rc.address)
        try:
            if rc.address:
                ray.init(address=rc.address, **kwargs)
            else:
                ray.init(num_cpus=rc.num_cpus, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = f"the Ray cluster at ray.address={rc.address!r}" if rc.address else "a local Ray"
            raise StageError(f"could not start or reach {where}: {str(e).splitlines()[0][:200]}") from None
    import ray.data

    # slmconvert's own progress display and messages are the only ones (Ray's logs stay in its session folder)
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A host:port (or ray://host:port) that does not answer fails now, in one line, not after Ray's own retries."""
    import socket

    target = address.removeprefix("ray://")
    if address == "auto" or ":" not in target:
        return
    host, _, port = target.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        raise StageError(f"cannot reach the Ray cluster at ray.address={address!r} ({type(e).__name__}: {e}); "
                         "check the address, or unset ray.address to run a local Ray") from None


def _actor_pool(ds_method, fn, **kwargs):
    """`map_groups` / `map_batches` on an actor pool whose workers are not restarted: a worker that dies fails
    the run, which a re-run redoes (nothing is recorded before every partition is written). Ray's restartable
    default also prints a core-worker error line on every run about its constructor arguments."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # `max_restarts` among the remote args: deprecated in 2.60
        try:
            return ds_method(fn, max_restarts=0, **kwargs)
        except TypeError:  # a Ray without it: its default
            return ds_method(fn, **kwargs)


def _workers(config, cpus: int) -> int:
    return config.ray.workers or cpus


# --------------------------------------------------------------------------- collect: the split


def _line_starts(path: Path, start: int, first_line: int, chunk_bytes: int) -> tuple[list[tuple[int, int, int]], int]:
    """Pieces (offset, first line, last line) of a JSONL file from `start`, each about `chunk_bytes`,
    cut right after a newline, and the number of the last line (as the reader counts them)."""
    pieces, line, offset = [], first_line, start
    piece_start, piece_line = start, first_line
    last_byte = b""
    with open(path, "rb") as f:
        f.seek(start)
        while True:
            block = f.read(1 << 24)
            if not block:
                break
            pos = 0
            while True:
                if offset + (len(block) - pos) - piece_start < chunk_bytes:
                    line += block.count(b"\n", pos)
                    offset += len(block) - pos
                    break
                cut = piece_start + chunk_bytes - offset + pos  # index in block where the piece would end
                nl = block.find(b"\n", max(cut, pos))
                if nl < 0:
                    line += block.count(b"\n", pos)
                    offset += len(block) - pos
                    break
                line += block.count(b"\n", pos, nl + 1)
                offset += nl + 1 - pos
                pos = nl + 1
                pieces.append((piece_start, piece_line, line - 1))
                piece_start, piece_line = offset, line
            last_byte = block[-1:]
    last_line = line - 1 if last_byte in (b"\n", b"") else line
    if offset > piece_start:
        pieces.append((piece_start, piece_line, last_line))
    return pieces, last_line


def split_work(collector, todo: list[dict[str, Any]], chunk_mb: float) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Parsing tasks (each a list of pieces) and the file records of the split files (what `local` records
    after reading them). Formats that join records across files (OpenAI Batch input and output) are one task."""
    from slmconvert.collect.formats import LogFormat, get_format

    chunk_bytes = max(1, int(chunk_mb * (1 << 20)))
    tasks: list[dict[str, Any]] = []
    joined: list[dict[str, Any]] = []
    infos: dict[str, dict[str, Any]] = {}
    for entry in todo:
        layout, fmt, encoding, compressed = collector.sniff(entry)
        piece = {k: entry[k] for k in ("path", "key", "size", "sha256", "offset", "line")} | {"format": fmt}
        if fmt is not None and type(get_format(fmt)).finish is not LogFormat.finish:
            joined.append(piece)
        elif layout == "lines" and not compressed and not encoding and entry["size"] - entry["offset"] > chunk_bytes:
            pieces, last_line = _line_starts(entry["path"], entry["offset"], entry["line"], chunk_bytes)
            for offset, first, last in pieces:
                tasks.append({"pieces": [piece | {"offset": offset, "line": first, "end_line": last}], "finish": False})
            infos[entry["key"]] = {"size": entry["size"], "sha256": entry["sha256"], "format": fmt, "layout": layout,
                                   "lines": last_line, "encoding": None, "compressed": False}
        else:
            tasks.append({"pieces": [piece], "finish": False})
    if joined:
        tasks.append({"pieces": joined, "finish": True})
    for i, t in enumerate(tasks):
        t["index"] = i
    return tasks, infos


# --------------------------------------------------------------------------- collect: the workers


def _parse_task(task: dict[str, Any], config_json: str, n_parts: int, known_ref: list) -> list[dict[str, Any]]:
    """One parsing task: its calls (partition, read order, JSON) and one summary row (partition -1)."""
    import ray

    from slmconvert.collect.partitions import partition_of
    from slmconvert.collect.stage import _Collector
    from slmconvert.config import PipelineConfig
    from slmconvert.progress import NULL_PROGRESS

    config = PipelineConfig.model_validate_json(config_json)
    known = ray.get(known_ref[0]) if known_ref else frozenset()
    collector = _Collector(config, NULL_PROGRESS)
    files = {}
    for piece in task["pieces"]:
        entry = dict(piece, path=Path(piece["path"]))
        info = collector.read_file(entry)
        if piece.get("end_line") is None:
            files[piece["key"]] = info
    if task["finish"]:
        collector.finish()
    base = task["index"] << SEQ_BITS
    rows, known_dups = [], 0
    for i, inv in enumerate(collector.invocations):
        if inv.id in known:
            known_dups += 1
            continue
        rows.append({"p": partition_of(inv.session_id, n_parts), "seq": base + i,
                     "data": json.dumps(inv.to_dict(), ensure_ascii=False)})
    summary = {"quarantine": collector.quarantine, "dropped": dict(collector.dropped), "noted": dict(collector.noted),
               "text_actions": {k: dict(v) for k, v in collector.text_actions.items()}, "formats": dict(collector.formats),
               "files": files, "known_duplicates": known_dups}
    rows.append({"p": -1, "seq": task["index"], "data": json.dumps(summary, ensure_ascii=False, default=str)})
    return rows


class ScrubWorker:
    """A Ray actor: a partition's calls in; deduplicated, scrubbed and written as the partition's shard (Presidio
    and spaCy loaded once per worker). Only a summary goes back to the driver."""

    def __init__(self, config_json: str, key_hex: str | None, template_values: list[str], stage_dir: str, first_shard: int,
                 mids_ref: list):
        from slmconvert.collect.partitions import scrubber_factory
        from slmconvert.config import PipelineConfig

        self.config = PipelineConfig.model_validate_json(config_json)
        self.templates = template_values
        # one process per worker: the pool is the parallelism, not spaCy's own processes
        self.make_scrubber = scrubber_factory(self.config.scrub, bytes.fromhex(key_hex) if key_hex else None, 1)
        self.stage_dir, self.first_shard, self.mids_ref = Path(stage_dir), first_shard, mids_ref
        self.known_mids: frozenset[str] | None = None

    def __call__(self, table):
        import pyarrow as pa
        import ray

        from slmconvert.collect.partitions import process_partition, write_partition
        from slmconvert.invocation import Invocation

        if self.known_mids is None:
            self.known_mids = ray.get(self.mids_ref[0]) if self.mids_ref else frozenset()
        p = table.column("p")[0].as_py()
        seqs, data = table.column("seq").to_pylist(), table.column("data").to_pylist()
        order = sorted(range(len(seqs)), key=seqs.__getitem__)
        calls = [Invocation.from_dict(json.loads(data[i])) for i in order]
        del data, table
        r = process_partition(p, calls, frozenset(), self.config.scrub, self.make_scrubber, self.templates)
        t = time.perf_counter()
        files = write_partition(self.stage_dir, r, self.known_mids, self.first_shard, bool(self.config.collect.tools_file))
        seconds = {**r.seconds, "write_s": time.perf_counter() - t}
        summary = {"files": files, "written": len(r.calls), "report": r.report, "duplicates": r.duplicates,
                   "scrub_dropped": r.scrub_dropped, "seconds": seconds}
        return pa.table({"p": pa.array([p], pa.int64()), "data": pa.array([json.dumps(summary, ensure_ascii=False)], pa.large_string())})


# --------------------------------------------------------------------------- collect: the driver


def collect_on_ray(config, workspace, todo: list[dict[str, Any]], n_parts: int, known_ids: set[str],
                   template_values: list[str], progress, *, known_mids: set[str], first_shard: int) -> ParsedCalls:
    from slmconvert.collect.partitions import ParsedCalls
    from slmconvert.collect.stage import _Collector

    cpus = ensure_ray(config)
    import ray
    import ray.data

    collector = _Collector(config, progress)
    tasks, inputs = split_work(collector, todo, config.ray.chunk_mb)
    key_hex = None
    if config.scrub.enabled:
        from slmconvert.scrub.engine import scrub_key

        key_hex = scrub_key(workspace, config.scrub.seed).hex()
    config_json = config.model_dump_json()
    known_ref = [ray.put(frozenset(known_ids))] if known_ids else []
    for t in tasks:
        for piece in t["pieces"]:
            piece["path"] = str(piece["path"])
    progress.start(f"ray: parsing {len(tasks)} piece(s) of {len(todo)} file(s)", None)
    # Parsed once, kept in Ray's object store (spilled to disk when large): the summaries are read first,
    # so `--strict` refuses before anything is written, then the calls go on to the scrub workers.
    parsed = ray.data.from_items(tasks, override_num_blocks=max(1, len(tasks)))
    parsed = parsed.flat_map(_parse_task, fn_args=(config_json, n_parts, known_ref)).materialize()
    known_dups = 0
    for row in parsed.filter(expr=_p_below(0)).iter_rows():
        s = json.loads(row["data"])
        collector.quarantine.extend(s["quarantine"])
        collector.dropped.update(s["dropped"])
        collector.noted.update(s["noted"])
        for rule, tools in s["text_actions"].items():
            collector.text_actions.setdefault(rule, Counter()).update(tools)
        collector.formats.update(s["formats"])
        inputs.update(s["files"])
        known_dups += s["known_duplicates"]
    order = {str(e["path"]): i for i, e in enumerate(todo)}  # tasks finish in any order: read order, as `local` has it
    collector.quarantine.sort(key=lambda q: (order.get(q["file"], len(order)), _locator_key(q["locator"])))
    progress.stop()
    pool = ray.data.ActorPoolStrategy(min_size=1, max_size=_workers(config, cpus))
    scrubbed = _actor_pool(parsed.filter(expr=~_p_below(0)).groupby("p").map_groups, ScrubWorker, batch_format="pyarrow",
                           compute=pool, num_cpus=1,
                           fn_constructor_args=(config_json, key_hex, list(template_values), str(workspace.stage_dir("collect")),
                                                first_shard, [ray.put(frozenset(known_mids))] if known_mids else []))
    return ParsedCalls(collector, inputs, _partitions(scrubbed.iter_batches(batch_format="pyarrow", batch_size=None), known_dups))


def _p_below(n: int):
    from ray.data.expressions import col

    return col("p") < n


def _locator_key(locator: str) -> tuple:
    """'line 12' before 'line 100'; 'index 3 ...' by its numbers."""
    import re

    return tuple(int(x) if x.isdigit() else x for x in re.split(r"(\d+)", locator))


def _partitions(batches, known_dups: int) -> Iterator[Any]:
    """The partitions' summaries as Ray finishes them (the workers wrote the shards; order does not matter)."""
    from slmconvert.collect.partitions import PartitionResult

    for b in batches:
        for p, data in zip(b.column("p").to_pylist(), b.column("data").to_pylist()):
            s = json.loads(data)
            yield PartitionResult(p, [], {}, s["report"], s["duplicates"] + known_dups, s["scrub_dropped"], s["seconds"],
                                  written=s["files"], n_written=s["written"])
            known_dups = 0
    if known_dups:
        yield PartitionResult(-1, [], {}, None, known_dups, 0, {})


# --------------------------------------------------------------------------- embedding


class EmbedWorker:
    """A Ray actor: chunks of texts in, their vectors out (the model loaded once per worker)."""

    def __init__(self, spec: dict[str, Any]):
        from slmconvert.embeddings import Embedder

        self.embedder = Embedder(**spec)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for texts in batch["texts"]:
            vecs = self.embedder.encode(list(texts))
            out.append(vecs.ravel())
        return {"chunk": batch["chunk"], "vectors": np.array(out, dtype=object)}


class RayEncoder:
    """`Embedder.encode` on a Ray actor pool: the same chunks, in the same order, as in one process."""

    def __init__(self, config):
        self.config = config
        self.chunk = config.ray.embed_chunk

    @property
    def checkpoint_chunks(self) -> int:
        """Chunks between two saves of the embedding cache: four per worker, so a save does not idle the pool long."""
        from slmconvert.embeddings import CHECKPOINT_CHUNKS

        return max(CHECKPOINT_CHUNKS, 4 * _workers(self.config, ensure_ray(self.config)))

    def __call__(self, embedder, chunks: list[list[str]], progress) -> list[np.ndarray]:
        cpus = ensure_ray(self.config)
        import ray.data

        spec = {"name": embedder.name, "batch_size": embedder.batch_size, "device": embedder.device,
                "max_seq_length": embedder.max_seq_length}
        ds = ray.data.from_items([{"chunk": i, "texts": c} for i, c in enumerate(chunks)], override_num_blocks=len(chunks))
        pool = ray.data.ActorPoolStrategy(min_size=1, max_size=min(len(chunks), _workers(self.config, cpus)))
        ds = _actor_pool(ds.map_batches, EmbedWorker, batch_size=1, compute=pool, num_cpus=1, fn_constructor_args=(spec,))
        out: list[np.ndarray | None] = [None] * len(chunks)
        for row in ds.iter_rows():
            i = int(row["chunk"])
            out[i] = np.asarray(row["vectors"], dtype=np.float32).reshape(len(chunks[i]), -1)
            progress.advance(len(chunks[i]))
        return out  # type: ignore[return-value]
