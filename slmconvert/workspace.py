"""The workspace: one folder per stage, each holding its data files and a manifest.json.

The manifest is the commit record of a stage. Data files are written first (each atomically,
under a fresh name); the manifest that lists them is written last (atomically). A run that is
interrupted before the manifest lands leaves only unlisted files, which the next run deletes:
readers only ever see files a manifest lists.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from slmconvert import __version__
from slmconvert.errors import StageError
from slmconvert.io import write_json_atomic

STAGES = ("collect", "scrub", "cluster", "select", "finetune", "evaluate")
STAGE_DIRS = {
    "collect": "invocations",
    "scrub": "scrubbed",
    "cluster": "clusters",
    "select": "candidates",
    "finetune": "models",
    "evaluate": "eval",
}


# Lock files this process holds. A forked child (NER workers, data loaders) closes its copies at
# once: an flock belongs to the open file, so a child that outlived a killed parent would
# otherwise keep the workspace locked in the name of a dead pid.
_HELD_LOCKS: set[int] = set()


def _release_inherited_locks() -> None:
    for fd in list(_HELD_LOCKS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_release_inherited_locks)


def die_with_parent() -> None:
    """Make this (worker) process die when its parent does, even by SIGKILL (Linux; elsewhere a no-op)."""
    import ctypes
    import signal

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


class DamagedManifest(StageError):
    """A manifest that is not what a stage wrote (hand-edited, truncated): --force rebuilds the stage."""


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class Manifest:
    stage: str
    config_hash: str
    input_hash: str
    inputs: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # includes dropped_<reason> counts
    timings: dict[str, float] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    status: str = "ran"  # ran | updated | skipped
    version: str = __version__
    created_at: str = field(default_factory=utcnow)
    updated_at: str = field(default_factory=utcnow)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def skipped(self) -> bool:
        return self.status == "skipped"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fingerprint(self) -> str:
        """Identifies this stage's output: what a later stage records as its input hash."""
        from slmconvert.io import sha256_obj

        return sha256_obj({"files": self.files, "input": self.input_hash, "config": self.config_hash})

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Manifest":
        known = {k: v for k, v in d.items() if k in Manifest.__dataclass_fields__}
        return Manifest(**known)


class Timer:
    """Collects named wall-clock timings for a manifest."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - t, 4)

    def total(self) -> dict[str, float]:
        return {**self.timings, "total_s": round(time.perf_counter() - self._start, 4)}


class Workspace:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"Workspace({str(self.root)!r})"

    def stage_dir(self, stage: str) -> Path:
        return self.root / STAGE_DIRS[stage]

    def manifest_path(self, stage: str) -> Path:
        return self.stage_dir(stage) / "manifest.json"

    def read_manifest(self, stage: str) -> Manifest | None:
        self.check_root()
        path = self.manifest_path(stage)
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise TypeError(f"a JSON object was expected, got {type(data).__name__}")
            m = Manifest.from_dict(data)
            if not all(isinstance(v, str) for v in (m.stage, m.config_hash, m.input_hash)) or not isinstance(m.files, list):
                raise TypeError("stage, hashes or file list missing or of the wrong type")
            return m
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as e:
            raise DamagedManifest(f"{path}: the manifest is damaged ({e}); rebuild the stage with "
                                  f"`slmconvert {stage} --workspace {self.root} --force`") from None

    def previous(self, stage: str, force: bool = False) -> Manifest | None:
        """A stage's own last manifest; with `force` a damaged one counts as none (the stage rebuilds)."""
        try:
            return self.read_manifest(stage)
        except DamagedManifest:
            if not force:
                raise
            self.manifest_path(stage).unlink(missing_ok=True)
            return None

    def check_root(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise StageError(f"the workspace {self.root} is a file, not a folder: choose another --workspace (or `workspace:` key)")

    def write_manifest(self, manifest: Manifest) -> None:
        manifest.updated_at = utcnow()
        write_json_atomic(self.manifest_path(manifest.stage), manifest.to_dict())

    def require_manifest(self, stage: str, needed_by: str) -> Manifest:
        m = self.read_manifest(stage)
        if m is None:
            raise StageError(
                f"{needed_by} needs the output of '{stage}', but {self.stage_dir(stage)} has none: "
                f"run `slmconvert {stage} --workspace {self.root}` first"
            )
        return m

    def unchanged(self, prev: Manifest | None, config_hash: str, input_hash: str, force: bool, still_valid: bool = True) -> bool:
        """True (and `prev` re-stamped as skipped) when a stage's last run used the same inputs and config."""
        if prev is None or force or not still_valid or prev.config_hash != config_hash or prev.input_hash != input_hash:
            return False
        prev.status = "skipped"
        self.write_manifest(prev)
        return True

    def invalidate(self, stage: str) -> None:
        """Withdraw a stage's manifest before rewriting its fixed-name files: an interrupted
        rewrite then reads as 'not run' instead of an old manifest over half-new files."""
        self.manifest_path(stage).unlink(missing_ok=True)

    def input_manifest(self, needed_by: str) -> tuple[str, Manifest]:
        """The stage whose invocations `needed_by` reads (scrub or collect) and its manifest."""
        stage = self.invocation_stage()
        return stage, self.require_manifest(stage, needed_by)

    def remove_unlisted(self, stage: str, manifest: Manifest | None, patterns: tuple[str, ...]) -> list[str]:
        """Delete data files no manifest lists (left by an interrupted run) and stray temp files."""
        d = self.stage_dir(stage)
        if not d.exists():
            return []
        listed = set(manifest.files) if manifest else set()
        removed = []
        for pattern in (*patterns, ".*.tmp"):
            for p in d.glob(pattern):
                if p.name not in listed:
                    p.unlink(missing_ok=True)
                    removed.append(p.name)
        return removed

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """One writer at a time per workspace: a second concurrent run fails fast, naming the holder."""
        self.check_root()
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / ".lock"
        f = open(path, "a+")
        try:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                raise StageError(f"{self.root} is in use by {holder}; wait for it to finish") from None
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()}")
            f.flush()
            _HELD_LOCKS.add(f.fileno())
            yield
        finally:
            _HELD_LOCKS.discard(f.fileno())
            f.close()

    def invocation_stage(self) -> str:
        """The stage whose invocations later stages read: `scrub` when it ran, else `collect`.

        A scrubbed/ older than invocations/ is an error, not a silent fallback to raw data.
        """
        cm = self.require_manifest("collect", "this stage")
        sm = self.read_manifest("scrub")
        if sm is None:
            return "collect"
        if sm.input_hash != cm.fingerprint():  # scrub records the collect output it read
            raise StageError(f"{self.stage_dir('scrub')} is older than {self.stage_dir('collect')}: "
                             f"run `slmconvert scrub --workspace {self.root}` again")
        return "scrub"
