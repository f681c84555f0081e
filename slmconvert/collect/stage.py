"""`collect`: log files in, invocations out (scrubbed by default), incrementally.

A run reads only what is new: files whose content is unchanged since the last run are not
read again, a JSONL file that grew is read from where it ended, and every invocation already
in the workspace (same id) is counted as a duplicate and not stored twice. A changed
collect/scrub configuration, or `force`, rebuilds the stage from all the listed files.
"""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

from slmconvert.collect.partitions import (
    ParsedCalls, PartitionResult, Spill, n_partitions, process_partition, scrubber_factory, write_partition,
)
from slmconvert.collect.formats import ParseContext, detect_format, expand_document, format_names, get_format, log_formats
from slmconvert.collect.records import MAX_DEPTH, RawError, UnreadableFile, find_log_files, read_records
from slmconvert.collect.textactions import load_rules
from slmconvert.collect.tools import ToolInference, load_tools_file, merge_tools
from slmconvert.config import PipelineConfig
from slmconvert.errors import FormatError, StageError
from slmconvert.invocation import Invocation, RecordError
from slmconvert.io import read_json, read_jsonl, sha256_file, sha256_obj, write_json_atomic, write_jsonl_atomic
from slmconvert.progress import NULL_PROGRESS, Progress
from slmconvert.store import SHARD_PATTERNS, TOOLS_FILE, next_shard_no
from slmconvert.workspace import Manifest, Timer, Workspace, utcnow

STAGE = "collect"
QUARANTINE_FILE = "quarantine.jsonl"
SCRUB_REPORT = "scrub_report.json"
SAMPLE_SIZE = 20
# Bump when readers change what they produce from the same bytes: forces a rebuild.
READER_VERSION = 3  # 3: dialects (Anthropic, Responses, LangChain, OTel parts) and tracing exports


class CollectStrictError(StageError):
    pass


def resolve_inputs(paths: list[str], recursive: bool) -> tuple[list[Path], list[Path]]:
    if not paths:
        raise StageError("collect needs at least one log file or folder (collect.paths, or PATH arguments)")
    files, skipped, missing = [], [], []
    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists():
            missing.append(raw)
            continue
        f, s = find_log_files(p, recursive)
        files.extend(f)
        skipped.extend(s)
    if missing:
        raise StageError("log path not found: " + ", ".join(missing))
    seen, unique = set(), []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    if not unique:
        raise StageError(f"no log files (*.json, *.jsonl, *.ndjson, optionally .gz) under: {', '.join(paths)}")
    return unique, skipped


def _config_hash(config: PipelineConfig, tools_from_file: list[dict] | None) -> str:
    cc = config.collect.model_dump(mode="json", exclude={"paths", "recursive", "strict"})
    scrub = config.scrub.model_dump(mode="json", exclude={"batch_size"}) if config.scrub.enabled else {"enabled": False}
    return sha256_obj({"collect": cc, "scrub": scrub, "tools": tools_from_file, "reader_version": READER_VERSION})


def _plan(files: list[Path], prev_inputs: dict[str, Any]) -> list[dict[str, Any]]:
    """What to read from each file: nothing (unchanged), its new tail (appended JSONL), or all."""
    plan = []
    for f in files:
        key = str(f.resolve())
        size = f.stat().st_size
        sha = sha256_file(f)
        old = prev_inputs.get(key)
        entry = {"path": f, "key": key, "size": size, "sha256": sha, "mode": "full", "offset": 0, "line": 1}
        if old and old["sha256"] == sha:
            entry["mode"] = "unchanged"
        elif (old and old.get("layout") == "lines" and not old.get("compressed") and not old.get("encoding")
              and not f.name.endswith(".gz") and size > old["size"]
              and sha256_file(f, old["size"]) == old["sha256"]):
            entry.update(mode="append", offset=old["size"], line=old.get("lines", 0) + 1)
        plan.append(entry)
    return plan


# Parsed calls handed to the partitions at a time (memory holds these, plus one partition when scrubbing).
FLUSH_EVERY = 5000


class _Writer:
    """Where deduplicated, scrubbed partitions go, in any order (Ray hands them over as they finish):
    partition p is shard `first_shard + p`, its messages deduplicated against the earlier runs' only, and
    the reports merged in partition order at the end, so the workspace does not depend on the order."""

    def __init__(self, stage_dir: Path, timer: Timer, known_mids: set[str], first_shard: int, tools_from_file: bool):
        self.stage_dir, self.timer, self.known_mids, self.first_shard = stage_dir, timer, known_mids, first_shard
        self.tools_from_file = tools_from_file
        self.written: list[str] = []
        self.reports: dict[int, dict] = {}
        self.fresh = self.duplicates = self.scrub_dropped = 0

    def __call__(self, result: PartitionResult) -> None:
        for step, seconds in result.seconds.items():
            self.timer.timings[step] = round(self.timer.timings.get(step, 0.0) + seconds, 4)
        self.duplicates += result.duplicates
        self.scrub_dropped += result.scrub_dropped
        if result.report is not None:
            self.reports[result.index] = result.report
        if result.written is not None:  # a Ray worker wrote it
            self.written += result.written
            self.fresh += result.n_written
            return
        with self.timer.step("write_s"):
            self.written += write_partition(self.stage_dir, result, self.known_mids, self.first_shard, self.tools_from_file)
        self.fresh += len(result.calls)

    @property
    def files(self) -> list[str]:
        return sorted(self.written)

    @property
    def report(self) -> dict | None:
        merged = None
        for index in sorted(self.reports):
            merged = _merge_reports(merged, self.reports[index])
        return merged


class _Collector:
    def __init__(self, config: PipelineConfig, progress: Progress, sink: Callable[[list[Invocation]], None] | None = None):
        self.cc = config.collect
        self.progress = progress
        self.sink = sink
        self.invocations: list[Invocation] = []
        self.quarantine: list[dict[str, Any]] = []
        self.dropped: Counter[str] = Counter()
        self.noted: Counter[str] = Counter()
        self.formats: Counter[str] = Counter()
        rules = load_rules(self.cc.text_actions)
        self.text_rules = [r for r in rules if not r.builtin]
        self.auto_rules = [r for r in rules if r.builtin]
        self.text_actions: dict[str, Counter[str]] = {}
        self.shared: dict[str, Any] = {}  # run-wide state of the formats (a batch's requests awaiting answers)

    def _context(self, path: str, locator: str, fmt_name: str) -> ParseContext:
        return ParseContext(path=path, locator=locator, format=fmt_name, agent=self.cc.agent, model=self.cc.model,
                            text_rules=self.text_rules, auto_rules=self.auto_rules, messages_path=self.cc.messages_path,
                            shared=self.shared)

    def _absorb(self, ctx: ParseContext) -> None:
        self.dropped.update(ctx.dropped)
        self.noted.update(ctx.noted)
        for rule, tools in ctx.text_actions.items():
            self.text_actions.setdefault(rule, Counter()).update(tools)
        for locator, reason, code in ctx.bad:
            self._quarantine(Path(ctx.path), locator, reason, code, ctx.format)

    def flush(self) -> None:
        """Hand the invocations parsed so far to the sink (kept in memory when there is none)."""
        if self.sink is not None and self.invocations:
            batch, self.invocations = self.invocations, []
            self.sink(batch)

    def finish(self) -> None:
        """Let every format used complete what spans files (a batch's output joined with its input)."""
        for name in list(self.formats):
            contexts: list[ParseContext] = []

            def new_ctx(path: str, locator: str, name: str = name) -> ParseContext:
                contexts.append(self._context(path, locator, name))
                return contexts[-1]

            invocations, bad = get_format(name).finish(self.shared, new_ctx)
            self.invocations.extend(invocations)
            for ctx in contexts:
                self._absorb(ctx)
            for path, locator, reason, code in bad:
                self._quarantine(Path(path), locator, reason, code, name)

    def _quarantine(self, path: Path, locator: str, reason: str, code: str, fmt: str | None) -> None:
        self.quarantine.append({"file": str(path), "locator": locator, "code": code, "reason": reason,
                                "format": fmt, "at": utcnow()})
        self.dropped[code] += 1

    def read_file(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Parse one file into invocations, streaming; a file that cannot be read at all is quarantined whole.

        `entry` may name the format (`format`, detected by whoever split the file) and the last line to
        read (`end_line`: a JSONL file read in pieces by several workers)."""
        path: Path = entry["path"]
        info: dict[str, Any] = {"size": entry["size"], "sha256": entry["sha256"]}
        try:
            with read_records(path, entry["offset"], entry["line"]) as (layout, items, stats):
                if entry.get("end_line") is not None:
                    items = itertools.takewhile(lambda _item: stats.lines <= entry["end_line"], items)
                info.update(self._parse(path, layout, self._records(path, layout, items), entry.get("format")))
                info.update(layout=layout, lines=stats.lines, encoding=stats.encoding, compressed=stats.compressed)
        except UnreadableFile as e:
            self._quarantine(path, "file", e.reason, e.code, None)
            info.update(layout="unreadable", lines=0, format=None)
        return info

    def _records(self, path: Path, layout: str, items, quarantine: bool = True) -> Iterator[tuple[Any, str]]:
        for item in items:
            if isinstance(item, RawError):
                if quarantine:
                    self._quarantine(path, item.locator, item.reason, item.code, None)
            else:  # a record (or the whole file) may hold many conversations, with file-level fields
                values = expand_document(item.value)
                if len(values) == 1:
                    yield values[0], item.locator
                elif item.locator == "document":
                    yield from ((v, f"index {i}") for i, v in enumerate(values))
                else:
                    yield from ((v, f"{item.locator} index {i}") for i, v in enumerate(values))

    def sniff(self, entry: dict[str, Any]) -> tuple[str, str | None, str | None, bool]:
        """(layout, format, encoding, compressed) of a file, from its first records (raises FormatError
        as reading it would); what is quarantined on the way is quarantined when the file is read."""
        path: Path = entry["path"]
        try:
            with read_records(path, entry["offset"], entry["line"]) as (layout, items, stats):
                if layout == "empty":
                    return layout, None, stats.encoding, stats.compressed
                sample = [r for r, _ in itertools.islice(self._records(path, layout, items, quarantine=False), SAMPLE_SIZE)]
                fmt_name = self.cc.format or detect_format(sample)
                if fmt_name is None and sample:
                    raise FormatError(f"{path}: matches no known log format (tried: {', '.join(format_names())}); "
                                      "pass --format NAME if you know it")
                return layout, fmt_name, stats.encoding, stats.compressed
        except UnreadableFile:
            return "unreadable", None, None, False

    def _parse(self, path: Path, layout: str, records: Iterator[tuple[Any, str]], fmt_name: str | None = None) -> dict[str, Any]:
        if layout == "empty":
            self.dropped["empty_file"] += 1
            return {"format": None}
        sample = list(itertools.islice(records, SAMPLE_SIZE))
        fmt_name = fmt_name or self.cc.format or detect_format([r for r, _ in sample])
        if fmt_name is None:
            if not sample:
                return {"format": None}  # every record was quarantined already; nothing else to say
            tried = ", ".join(format_names())
            raise FormatError(f"{path}: matches no known log format (tried: {tried}); pass --format NAME if you know it")
        fmt = get_format(fmt_name)
        self.formats[fmt_name] += 1
        self.progress.start(f"reading {path.name}", None)
        for value, locator in itertools.chain(sample, records):
            ctx = self._context(str(path), locator, fmt_name)
            try:
                self.invocations.extend(fmt.parse(value, ctx))
                if len(self.invocations) >= FLUSH_EVERY:
                    self.flush()
            except RecordError as e:
                self._quarantine(path, locator, e.reason, e.code, fmt_name)
            except RecursionError:  # nesting a format's own walk cannot follow
                self._quarantine(path, locator, f"nested too deeply to read ({MAX_DEPTH}+ levels)", "too_deep", fmt_name)
            except (TypeError, AttributeError, KeyError, IndexError, ValueError) as e:  # a reader's bug: lose this record only
                self._quarantine(path, locator, f"the {fmt_name} reader failed on this record ({type(e).__name__}: {str(e)[:120]}); "
                                 "please report it", "reader_error", fmt_name)
            self._absorb(ctx)
            self.progress.advance()
        self.progress.stop()
        return {"format": fmt_name}


def _collect_locally(config: PipelineConfig, workspace: Workspace, todo: list[dict[str, Any]], n_parts: int, known_ids: set[str],
                     template_values: list[str], progress: Progress) -> ParsedCalls:
    """The local engine: files read in this process, parsed calls spilled by partition (a private temporary folder
    when there is more than one), partitions scrubbed one at a time as they are asked for."""
    spill = Spill(n_parts)
    try:
        collector = _Collector(config, progress, spill.add)
        inputs = {entry["key"]: collector.read_file(entry) for entry in todo}
        collector.finish()
        collector.flush()
    except BaseException:
        spill.close()
        raise
    return ParsedCalls(collector, inputs, _local_partitions(config, workspace, spill, known_ids, template_values, progress),
                       release=spill.close)


def _local_partitions(config: PipelineConfig, workspace: Workspace, spill: Spill, known_ids: set[str], template_values: list[str],
                      progress: Progress) -> Iterator[PartitionResult]:
    from slmconvert.scrub.engine import scrub_key

    key = scrub_key(workspace, config.scrub.seed) if config.scrub.enabled else None
    make_scrubber = scrubber_factory(config.scrub, key, config.scrub.n_process)
    for index, calls in spill.partitions():  # one partition: the scrubber's own progress bars (NER) show
        yield process_partition(index, calls, known_ids, config.scrub, make_scrubber, template_values,
                                progress if spill.n == 1 else NULL_PROGRESS)


def _columns(stage_dir: Path, files: list[str], prefix: str, columns: list[str]) -> Iterator[dict[str, list]]:
    """The listed shards with this prefix, one at a time, only these columns (memory: one shard's columns)."""
    import pyarrow.parquet as pq

    for name in files:
        if name.startswith(prefix) and name.endswith(".parquet"):
            yield pq.read_table(stage_dir / name, columns=columns).to_pydict()


def _existing(stage_dir: Path, manifest: Manifest | None) -> tuple[set[str], set[str]]:
    """Ids and message ids already stored."""
    if manifest is None:
        return set(), set()
    ids, mids = set(), set()
    for part in _columns(stage_dir, manifest.files, "invocations-", ["id"]):
        ids.update(part["id"])
    for part in _columns(stage_dir, manifest.files, "messages-", ["id"]):
        mids.update(part["id"])
    return ids, mids


def _tool_inference(stage_dir: Path, files: list[str]) -> ToolInference:
    """Tool schemas inferred from every stored call of an inferred tool set, shard by shard in order."""
    inference = ToolInference()
    for part in _columns(stage_dir, files, "invocations-", ["toolset", "response_tool_calls"]):
        for ts, tcs in zip(part["toolset"], part["response_tool_calls"]):
            if ts:
                inference.ensure(ts)
                for c in json.loads(tcs):
                    inference.add(ts, c["name"], c["arguments"])
    return inference


def _totals(stage_dir: Path, files: list[str]) -> dict[str, Any]:
    n = tool_calls = 0
    sessions: set[str] = set()
    tools: set[str] = set()
    for part in _columns(stage_dir, files, "invocations-", ["session_id", "n_tool_calls", "response_tool_calls"]):
        n += len(part["session_id"])
        sessions.update(part["session_id"])
        for tcs, k in zip(part["response_tool_calls"], part["n_tool_calls"]):
            if k:
                tool_calls += 1
                tools.update(c["name"] for c in json.loads(tcs))
    return {"invocations": n, "tool_calls": tool_calls, "text": n - tool_calls, "sessions": len(sessions), "tools": sorted(tools)}


def run(config: PipelineConfig, workspace: Workspace, *, force: bool = False, progress: Progress = NULL_PROGRESS) -> Manifest:
    cc = config.collect
    if cc.format is not None:
        log_formats.get(cc.format)  # unknown name -> clear error before any work
    if config.scrub.enabled:  # a bad policy fails now, not only once a run finds records to scrub
        from slmconvert.scrub.policy import load_policy

        load_policy(config.scrub.policy)
    timer = Timer()
    files, skipped_files = resolve_inputs(cc.paths, cc.recursive)
    tools_from_file = load_tools_file(cc.tools_file) if cc.tools_file else None
    config_hash = _config_hash(config, tools_from_file)
    stage_dir = workspace.stage_dir(STAGE)

    with workspace.lock():
        prev = workspace.previous(STAGE, force)
        rebuild = force or prev is None or prev.config_hash != config_hash
        base = None if rebuild else prev
        workspace.remove_unlisted(STAGE, prev, SHARD_PATTERNS)
        with timer.step("hash_s"):
            plan = _plan(files, base.inputs if base else {})
        todo = [e for e in plan if e["mode"] != "unchanged"]
        if base is not None and not todo:
            base.status = "skipped"
            base.extra["last_run"] = {"at": utcnow(), "status": "skipped", "files_read": 0, "new_invocations": 0,
                                      "duplicates": 0, "quarantined": 0}
            workspace.write_manifest(base)
            return base

        known_ids, known_mids = _existing(stage_dir, base)
        old_templates = (read_json(stage_dir / SCRUB_REPORT).get("template_values_kept", [])
                         if base and (stage_dir / SCRUB_REPORT).exists() else [])
        writer = _Writer(stage_dir, timer, known_mids, next_shard_no(prev), bool(cc.tools_file))
        n_parts = n_partitions(sum(e["size"] - e["offset"] for e in todo), cc.partition_mb)
        inputs = dict(base.inputs) if base else {}
        t_read = time.perf_counter()
        if config.engine == "ray":  # workers write message shards themselves: they need what is stored and the shard numbers
            from slmconvert.distributed import collect_on_ray

            parsed = collect_on_ray(config, workspace, todo, n_parts, known_ids, old_templates, progress,
                                    known_mids=known_mids, first_shard=writer.first_shard)
        else:  # the writer below stores messages and skips the known ones
            parsed = _collect_locally(config, workspace, todo, n_parts, known_ids, old_templates, progress)
        collector = parsed.collector
        try:
            inputs.update(parsed.inputs)
            timer.timings["parse_s"] = round(time.perf_counter() - t_read, 4)
            new_quarantine = collector.quarantine
            if cc.strict and new_quarantine:  # nothing of this run has been written yet
                qpath = stage_dir / "quarantine.strict.jsonl"
                write_jsonl_atomic(qpath, new_quarantine)
                raise CollectStrictError(
                    f"--strict: {len(new_quarantine)} bad record(s); nothing was stored. Reasons are in {qpath} "
                    f"(first: {new_quarantine[0]['file']} {new_quarantine[0]['locator']}: {new_quarantine[0]['reason']})"
                )
            if n_parts > 1:
                progress.start("collect: deduplicate, scrub, write partitions", n_parts)
            for result in parsed.results:
                writer(result)
                if n_parts > 1:
                    progress.advance()
            if n_parts > 1:
                progress.stop()
        finally:
            parsed.close()
        duplicates = writer.duplicates
        collector.dropped["duplicate"] += duplicates
        if writer.report is not None:  # scrubbed something this run (as before batching: no key when scrubbing is off)
            collector.dropped["scrub_policy"] += writer.scrub_dropped

        scrub_info: dict[str, Any] = {"enabled": config.scrub.enabled}
        if config.scrub.enabled:
            scrub_info.update(policy=config.scrub.policy, surrogates=config.scrub.surrogates)
        report = writer.report
        if report is not None:
            report["template_values_kept"] = sorted(set(report.get("template_values_kept", [])) | set(old_templates))
        with timer.step("write_s"):
            files_out = list(base.files) if base else []
            files_out += writer.files
            inference = _tool_inference(stage_dir, files_out)
            tool_inventory = {k: merge_tools(inference.tools(k), tools_from_file) for k in inference.keys()}
            write_json_atomic(stage_dir / TOOLS_FILE, tool_inventory)
            if TOOLS_FILE not in files_out:
                files_out.append(TOOLS_FILE)
            full_reads = {str(e["path"]) for e in todo if e["mode"] == "full"}
            old_q = [q for q in read_jsonl(stage_dir / QUARANTINE_FILE) if q["file"] not in full_reads] if base else []
            quarantine = old_q + new_quarantine
            write_jsonl_atomic(stage_dir / QUARANTINE_FILE, quarantine)
            if report is not None:
                report = _merge_reports(read_json(stage_dir / SCRUB_REPORT) if base else None, report)
                write_json_atomic(stage_dir / SCRUB_REPORT, report)
                if SCRUB_REPORT not in files_out:
                    files_out.append(SCRUB_REPORT)
            elif config.scrub.enabled and (stage_dir / SCRUB_REPORT).exists():
                report = read_json(stage_dir / SCRUB_REPORT)
            if config.scrub.enabled and report is not None:
                scrub_info["entities"] = {k: v["values"] for k, v in report["entities"].items() if v["values"]}
            (stage_dir / "quarantine.strict.jsonl").unlink(missing_ok=True)
        fresh_n = writer.fresh

        totals = _totals(stage_dir, files_out)
        counts = {k: v for k, v in (base.counts if base else {}).items() if k.startswith(("dropped_", "kept_"))}
        for reason, n in collector.dropped.items():
            counts[f"dropped_{reason}"] = counts.get(f"dropped_{reason}", 0) + n
        for what, n in collector.noted.items():
            counts[f"kept_{what}"] = counts.get(f"kept_{what}", 0) + n
        counts.update({k: v for k, v in totals.items() if k != "tools"})
        counts["quarantined"] = len(quarantine)
        counts["files"] = len(inputs)
        status = "ran" if base is None else "updated"
        manifest = Manifest(
            stage=STAGE,
            config_hash=config_hash,
            input_hash=sha256_obj({k: v["sha256"] for k, v in sorted(inputs.items())}),
            inputs=inputs,
            counts=counts,
            timings=timer.total(),
            files=files_out,
            status=status,
            created_at=base.created_at if base else utcnow(),
            extra={
                "tools": totals["tools"],
                "formats": dict(collector.formats),
                # rule -> tool -> calls: what `serve` renders back into text for an agent that acts in text
                "text_actions": _merge_actions(base.extra.get("text_actions", {}) if base else {}, collector.text_actions),
                "scrub": scrub_info,
                "skipped_files": [str(p) for p in skipped_files],
                "last_run": {"at": utcnow(), "status": status, "files_read": len(todo),
                             "appended_files": sum(1 for e in todo if e["mode"] == "append"),
                             "new_invocations": fresh_n, "duplicates": duplicates,
                             "quarantined": len(new_quarantine)},
            },
        )
        workspace.write_manifest(manifest)
        workspace.remove_unlisted(STAGE, manifest, SHARD_PATTERNS)
        return manifest


def _merge_actions(old: dict[str, dict[str, int]], new: dict[str, Counter]) -> dict[str, dict[str, int]]:
    out = {rule: Counter(tools) for rule, tools in old.items()}
    for rule, tools in new.items():
        out.setdefault(rule, Counter()).update(tools)
    return {rule: dict(sorted(tools.items())) for rule, tools in sorted(out.items())}


def _merge_reports(old: dict | None, new: dict) -> dict:
    """Cumulative scrub report across incremental runs (counts add up; latest examples kept)."""
    if not old:
        return new
    out = dict(new)
    for key in ("invocations", "sessions", "dropped_invocations", "units", "ner_units", "characters"):
        out[key] = old.get(key, 0) + new.get(key, 0)
    entities = {k: dict(v) for k, v in old.get("entities", {}).items()}
    for k, v in new["entities"].items():
        e = entities.setdefault(k, {"values": 0, "replaced": 0, "kept": 0, "action": v["action"]})
        for f in ("values", "replaced", "kept"):
            e[f] = e.get(f, 0) + v[f]
        e["action"] = v["action"]
    out["entities"] = dict(sorted(entities.items()))
    fields = {k: dict(v) for k, v in old.get("fields", {}).items()}
    for f, ents in new["fields"].items():
        for k, n in ents.items():
            fields.setdefault(f, {})[k] = fields.get(f, {}).get(k, 0) + n
    out["fields"] = fields
    out["examples"] = {**old.get("examples", {}), **new.get("examples", {})}
    out["template_values_kept"] = sorted(set(old.get("template_values_kept", [])) | set(new.get("template_values_kept", [])))
    return out


def summary(manifest: Manifest, workspace: Workspace) -> dict[str, Any]:
    """The `--json` object of `slmconvert collect`."""
    c = manifest.counts
    last = manifest.extra.get("last_run", {})
    return {
        "invocations": c.get("invocations", 0),
        "tool_calls": c.get("tool_calls", 0),
        "text": c.get("text", 0),
        "sessions": c.get("sessions", 0),
        "tools": manifest.extra.get("tools", []),
        "quarantined": c.get("quarantined", 0),
        "duplicates": last.get("duplicates", 0),
        "new_invocations": last.get("new_invocations", 0),
        "status": manifest.status,
        "scrubbed": bool(manifest.extra.get("scrub", {}).get("enabled")),
        "workspace": str(workspace.root),
    }
