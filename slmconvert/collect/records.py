"""Reading raw JSON records out of log files, keeping every good record and locating every bad one.

JSONL is read line by line (a bad line never costs its neighbours). A JSON array is decoded
element by element, so a file truncated in the middle still yields every complete element
before the cut. Bytes that are not UTF-8 are located and reported instead of failing the file.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

LOG_SUFFIXES = (".json", ".jsonl", ".ndjson", ".json.gz", ".jsonl.gz", ".ndjson.gz")


@dataclass(slots=True)
class RawRecord:
    value: Any
    locator: str  # "line 12" or "index 3"
    end_offset: int | None = None  # byte offset just after this record (JSONL only)


@dataclass(slots=True)
class RawError:
    locator: str
    reason: str
    code: str


def _open_bytes(path: Path) -> bytes:
    if path.name.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            return f.read()
    return path.read_bytes()


def _has_bad_utf8(value: Any) -> bool:
    """True when a decoded value carries bytes that were not valid UTF-8 (kept as lone surrogates)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _line_col(text: str, pos: int) -> str:
    line = text.count("\n", 0, pos) + 1
    col = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return f"line {line} column {col}"


def sniff_layout(data: bytes) -> str:
    """'array' for a JSON array, 'object' for one JSON document, 'lines' for JSONL, 'empty'."""
    head = data.lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head:
        return "empty"
    if head[:1] == b"[":
        return "array"
    if head[:1] == b"{":
        # One pretty-printed object spans lines; JSONL has a complete object on its first line.
        first_line = head.split(b"\n", 1)[0]
        try:
            json.loads(first_line)
            return "lines"
        except (json.JSONDecodeError, UnicodeDecodeError):
            return "object"
    return "lines"


def iter_jsonl(data: bytes, start_offset: int = 0, start_line: int = 1) -> Iterator[RawRecord | RawError]:
    pos, line_no = start_offset, start_line
    n = len(data)
    while pos < n:
        end = data.find(b"\n", pos)
        end = n if end == -1 else end + 1
        raw = data[pos:end]
        if line_no == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")
        loc = f"line {line_no}"
        stripped = raw.strip()
        if stripped:
            complete = raw.endswith(b"\n")
            try:
                text = stripped.decode("utf-8")
            except UnicodeDecodeError as e:
                yield RawError(loc, f"invalid UTF-8 at byte {e.start} of the line", "invalid_utf8")
            else:
                try:
                    yield RawRecord(json.loads(text), loc, end)
                except json.JSONDecodeError as e:
                    if not complete:
                        yield RawError(loc, f"truncated last line ({e.msg} at column {e.colno})", "truncated")
                    else:
                        yield RawError(loc, f"malformed JSON: {e.msg} at column {e.colno}", "malformed_json")
        pos, line_no = end, line_no + 1


def iter_json_document(data: bytes) -> Iterator[RawRecord | RawError]:
    text = data.decode("utf-8", errors="surrogateescape").lstrip("\ufeff")
    decoder = json.JSONDecoder()
    i = len(text) - len(text.lstrip())
    if text[i : i + 1] != "[":
        try:
            value, _ = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            yield RawError("document", f"malformed JSON at {_line_col(text, e.pos)}: {e.msg}", "malformed_json")
            return
        if _has_bad_utf8(value):
            yield RawError("document", "invalid UTF-8 bytes in the document", "invalid_utf8")
        else:
            yield RawRecord(value, "document")
        return
    i += 1
    index = 0
    n = len(text)
    while True:
        while i < n and text[i] in " \t\r\n":
            i += 1
        if i >= n:
            yield RawError(f"index {index}", "file ends before the closing ']' (truncated?); the elements before it are kept", "truncated")
            return
        if text[i] == "]":
            return
        try:
            value, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            truncated = e.pos >= n - 1 or "Unterminated" in e.msg or "Expecting" in e.msg and e.pos >= n - 2
            code = "truncated" if truncated else "malformed_json"
            yield RawError(
                f"index {index}",
                f"malformed JSON at {_line_col(text, e.pos)}: {e.msg}; this element and the rest of the file cannot be read",
                code,
            )
            return
        if _has_bad_utf8(value):
            yield RawError(f"index {index}", "invalid UTF-8 bytes inside this element", "invalid_utf8")
        else:
            yield RawRecord(value, f"index {index}")
        index += 1
        while i < n and text[i] in " \t\r\n":
            i += 1
        if i < n and text[i] == ",":
            i += 1
        elif i < n and text[i] != "]":
            yield RawError(f"index {index}", f"expected ',' or ']' at {_line_col(text, i)}; the rest of the file cannot be read", "malformed_json")
            return


def read_records(path: Path, start_offset: int = 0, start_line: int = 1) -> tuple[str, Iterator[RawRecord | RawError]]:
    """(layout, records) for a log file. With `start_offset`, JSONL reading resumes there."""
    data = _open_bytes(path)
    layout = sniff_layout(data)
    if layout == "empty":
        return layout, iter(())
    if layout == "lines":
        return layout, iter_jsonl(data, start_offset, start_line)
    return layout, iter_json_document(data)


def expand_document(value: Any) -> list[Any]:
    """A single JSON document may wrap its records: {"data": [...]} or {"conversations": [...]}."""
    if isinstance(value, dict):
        for key in ("data", "records", "conversations", "items", "logs", "invocations"):
            if isinstance(value.get(key), list) and len(value) <= 3:
                return value[key]
    return [value]


def find_log_files(path: Path, recursive: bool = True) -> tuple[list[Path], list[Path]]:
    """(log files, skipped files) under a path. A file named directly is always read."""
    if path.is_file():
        return [path], []
    pattern = "**/*" if recursive else "*"
    files, skipped = [], []
    for p in sorted(path.glob(pattern)):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(path).parts):
            continue
        (files if p.name.lower().endswith(LOG_SUFFIXES) else skipped).append(p)
    return files, skipped
