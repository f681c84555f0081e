"""Reading raw JSON records out of log files, keeping every good record and locating every bad one.

JSONL is read line by line (a bad line never costs its neighbours). A JSON array is decoded
element by element, so a file truncated in the middle still yields every complete element
before the cut. Bytes that are not UTF-8 are located and reported instead of failing the file.
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import io
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

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


GZIP_MAGIC = b"\x1f\x8b"
# BOM -> codec. UTF-32 before UTF-16: the UTF-32-LE BOM starts with the UTF-16-LE one.
BOMS = ((b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"), (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))
MAX_DEPTH = 256  # nesting beyond this is no log record (and would overflow recursive readers downstream)
_READ_ERRORS = (OSError, EOFError, zlib.error, UnicodeDecodeError, ValueError)


class UnreadableFile(Exception):
    """The file as a whole cannot be read (corrupt compression, unknown encoding): quarantined with the reason."""

    def __init__(self, reason: str, code: str):
        super().__init__(reason)
        self.reason, self.code = reason, code


def _gzip_reason(e: BaseException) -> str:
    if isinstance(e, EOFError):
        return "truncated gzip file (it ends before the compressed stream does)"
    return f"corrupt gzip data ({type(e).__name__}: {e})"


def open_log(path: Path) -> tuple[BinaryIO, str | None, bool]:
    """A binary stream of the file's UTF-8 text, the encoding it was converted from (None: UTF-8),
    and whether it was compressed.

    Compression is recognised by its magic bytes, not the file name (a `.gz` that is plain text
    is read as text, a gzip file without `.gz` is decompressed). A UTF-16/32 byte-order mark is
    honoured: the text is transcoded to UTF-8 as it streams.
    """
    raw = open(path, "rb")
    try:
        compressed = raw.read(2) == GZIP_MAGIC
        raw.seek(0)
        f: BinaryIO = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw  # type: ignore[assignment]
        try:
            head = f.peek(4)[:4] if hasattr(f, "peek") else b""
        except _READ_ERRORS as e:
            raise UnreadableFile(_gzip_reason(e), "corrupt_gzip") from None
        for bom, codec in BOMS:
            if head.startswith(bom):
                return _Transcoded(io.TextIOWrapper(f, encoding=codec, newline="")), codec.upper(), compressed
        return f, None, compressed
    except BaseException:
        raw.close()
        raise


class _Transcoded(io.RawIOBase):
    """A UTF-16/32 text stream read back as UTF-8 bytes, line by line."""

    def __init__(self, text: io.TextIOWrapper):
        self.text, self.buf = text, b""

    def readable(self) -> bool:
        return True

    def readline(self, size: int = -1) -> bytes:  # noqa: ARG002 - whole lines only
        return self.text.readline().encode("utf-8", "surrogatepass")

    def readinto(self, b) -> int:
        while len(self.buf) < len(b):
            chunk = self.text.read(1 << 16)
            if not chunk:
                break
            self.buf += chunk.encode("utf-8", "surrogatepass")
        n = min(len(b), len(self.buf))
        b[:n], self.buf = self.buf[:n], self.buf[n:]
        return n

    def close(self) -> None:
        self.text.close()
        super().close()


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Nesting deeper than `limit`, found without recursion."""
    if not isinstance(value, (dict, list)):
        return False
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if d > limit:
            return True
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values() if isinstance(x, (dict, list)))
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v if isinstance(x, (dict, list)))
    return False


def _loads(text: str) -> Any:
    """json.loads that turns pathological nesting into a JSONDecodeError-like ValueError."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise _TooDeep() from None
    # Fewer brackets than the limit cannot nest that deep: most records skip the walk.
    if text.count("[") + text.count("{") > MAX_DEPTH and too_deep(value):
        raise _TooDeep()
    return value


class _TooDeep(ValueError):
    reason = f"JSON nested deeper than {MAX_DEPTH} levels: not a log record"
    code = "too_deep"


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


def sniff_layout(head: bytes) -> str:
    """'array' for a JSON array, 'object' for one JSON document, 'lines' for JSONL, 'empty'.
    `head` is the start of the file, up to the end of its first non-blank line."""
    head = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head:
        return "empty"
    if head[:1] == b"[":
        return "array"
    if head[:1] == b"{":
        # One pretty-printed object spans lines; JSONL has a complete object on its first line.
        first_line = head.split(b"\n", 1)[0]
        try:
            _loads(first_line.decode("utf-8"))
            return "lines"
        except _TooDeep:
            return "lines"  # one complete (if absurd) value on the first line: JSONL
        except (ValueError, UnicodeDecodeError):
            return "object"
    return "lines"


def iter_jsonl(f: BinaryIO, start_line: int = 1, head: list[bytes] | None = None, stats: "ReadStats | None" = None
               ) -> Iterator[RawRecord | RawError]:
    """Records of a JSONL stream, one line at a time (memory stays flat with the file size).
    `head`: lines already read from `f` (to sniff its layout), processed first."""
    line_no = start_line
    stats = stats if stats is not None else ReadStats()
    pending = list(head or [])
    pending.reverse()
    while True:
        if pending:
            raw = pending.pop()
        else:
            try:
                raw = f.readline()
            except _READ_ERRORS as e:
                yield RawError(f"line {line_no}", _gzip_reason(e) + "; the lines before it are kept", "corrupt_gzip")
                return
        if not raw:
            return
        if line_no == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")
        stats.lines = line_no
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
                    yield RawRecord(_loads(text), loc)
                except _TooDeep as e:
                    yield RawError(loc, e.reason, e.code)
                except json.JSONDecodeError as e:
                    if not complete:
                        yield RawError(loc, f"truncated last line ({e.msg} at column {e.colno})", "truncated")
                    else:
                        yield RawError(loc, f"malformed JSON: {e.msg} at column {e.colno}", "malformed_json")
        line_no += 1


def _decode_one(decoder: json.JSONDecoder, text: str, i: int) -> tuple[Any, int]:
    try:
        value, end = decoder.raw_decode(text, i)
    except RecursionError:
        raise _TooDeep() from None
    if text.count("[", i, end) + text.count("{", i, end) > MAX_DEPTH and too_deep(value):
        raise _TooDeep()
    return value, end


def iter_json_document(data: bytes) -> Iterator[RawRecord | RawError]:
    text = data.decode("utf-8", errors="surrogateescape").lstrip("\ufeff")
    decoder = json.JSONDecoder()
    i = len(text) - len(text.lstrip())
    if text[i : i + 1] != "[":
        try:
            value, _ = _decode_one(decoder, text, i)
        except _TooDeep as e:
            yield RawError("document", e.reason, e.code)
            return
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
            value, i = _decode_one(decoder, text, i)
        except _TooDeep as e:
            yield RawError(f"index {index}", e.reason + "; this element and the rest of the file cannot be read", e.code)
            return
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


_MARK = "\U0010fffe"  # stands in for bytes that are not UTF-8 (a noncharacter: never in real text)
codecs.register_error("slmconvert-mark", lambda e: (_MARK, e.end))


class _Utf8Checked(io.RawIOBase):
    """`head` then the rest of `f`, re-encoded as valid UTF-8: a byte that is not UTF-8 becomes a marker
    character, so the streaming parser reads on and the element holding it is quarantined alone."""

    def __init__(self, head: bytes, f: BinaryIO):
        self.f, self.pending = f, head
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="slmconvert-mark")
        self.buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self.buf:
            chunk, self.pending = (self.pending, b"") if self.pending else (self.f.read(1 << 20), b"")
            self.buf = self.decoder.decode(chunk, final=not chunk).encode("utf-8")
            if not chunk:
                break
        n = min(len(b), len(self.buf))
        b[:n], self.buf = self.buf[:n], self.buf[n:]
        return n


def iter_json_array(head: bytes, f: BinaryIO) -> Iterator[RawRecord | RawError]:
    """The elements of a JSON array, streamed with ijson: memory holds one element, not the file.

    A truncated file keeps every complete element before the cut; an element nested too deeply or
    holding bytes that are not UTF-8 is quarantined alone; malformed JSON ends the file there (the
    parser cannot find the next element's start), keeping what came before."""
    import ijson

    index = 0
    stream = io.BufferedReader(_Utf8Checked(head.removeprefix(b"\xef\xbb\xbf"), f), 1 << 20)
    try:
        for value in ijson.items(stream, "item", use_float=True):
            if isinstance(value, (dict, list)) and too_deep(value):
                yield RawError(f"index {index}", _TooDeep.reason, _TooDeep.code)
            elif _MARK in json.dumps(value, ensure_ascii=False):
                yield RawError(f"index {index}", "invalid UTF-8 bytes inside this element", "invalid_utf8")
            else:
                yield RawRecord(value, f"index {index}")
            index += 1
    except ijson.common.IncompleteJSONError as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else "incomplete JSON"
        if "premature EOF" in msg or "Incomplete" in msg:
            yield RawError(f"index {index}", "file ends before the closing ']' (truncated?); the elements before it are kept", "truncated")
        else:
            yield RawError(f"index {index}", f"malformed JSON ({msg}); this element and the rest of the file cannot be read", "malformed_json")
    except ijson.common.JSONError as e:
        yield RawError(f"index {index}", f"malformed JSON ({e}); this element and the rest of the file cannot be read", "malformed_json")
    except _READ_ERRORS as e:
        yield RawError(f"index {index}", _gzip_reason(e) + "; the elements before it are kept", "corrupt_gzip")


@dataclass(slots=True)
class ReadStats:
    lines: int = 0  # last line number read (JSONL)
    encoding: str | None = None  # what the text was transcoded from (None: UTF-8)
    compressed: bool = False


@contextlib.contextmanager
def read_records(path: Path, start_offset: int = 0, start_line: int = 1) -> Iterator[tuple[str, Iterator[RawRecord | RawError], ReadStats]]:
    """(layout, records, stats) of a log file, streamed. With `start_offset`, JSONL resumes there.

    JSONL and JSON arrays are streamed (one record in memory at a time); a single JSON document
    that is not an array is read whole (it is one value). A file
    that cannot be read at all raises `UnreadableFile`.
    """
    stats = ReadStats(lines=start_line - 1)
    f, stats.encoding, stats.compressed = open_log(path)
    try:
        head: list[bytes] = []
        try:
            if start_offset:
                f.seek(start_offset)
            while True:  # up to the first non-blank line; an array's first line (maybe the whole file) is not read whole
                chunk = f.readline(1 << 16)
                head.append(chunk)
                if not chunk or not chunk.strip():
                    if not chunk:
                        break
                    continue
                if not start_offset and chunk.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"[":
                    break
                while not head[-1].endswith(b"\n") and (more := f.readline()):
                    head.append(more)
                break
        except _READ_ERRORS as e:
            if stats.compressed:
                raise UnreadableFile(_gzip_reason(e), "corrupt_gzip") from None
            raise UnreadableFile(f"unreadable ({type(e).__name__}: {e})", "unreadable") from None
        first = b"".join(head)
        layout = ("lines" if first.strip() else "empty") if start_offset else sniff_layout(first)
        if layout == "empty":
            yield layout, iter(()), stats
        elif layout == "lines":
            yield layout, iter_jsonl(f, start_line, first.splitlines(keepends=True), stats), stats
        elif layout == "array":
            yield layout, iter_json_array(first, f), stats
        else:
            try:
                data = first + f.read()
            except _READ_ERRORS as e:
                raise UnreadableFile(_gzip_reason(e), "corrupt_gzip") from None
            yield layout, iter_json_document(data), stats
    finally:
        f.close()


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
