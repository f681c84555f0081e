"""Files that used to crash collect or lose good files: each is quarantined with the reason, and
every good file and record beside it is kept (the CLI exits 0 with no traceback)."""

import gzip
import json

from typer.testing import CliRunner

from slmconvert.cli import app
from slmconvert.io import read_jsonl
from slmconvert.store import load_invocations
from slmconvert.workspace import Workspace
from tests.conftest import rr_record, write_jsonl

runner = CliRunner()


def _collect(ws, *paths):
    r = runner.invoke(app, ["collect", *map(str, paths), "-w", str(ws), "--no-scrub", "--json"])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r, {(q["file"].rsplit("/", 1)[-1], q["locator"]): q for q in read_jsonl(ws / "invocations" / "quarantine.jsonl")}


def _good(tmp_path, name="good.jsonl", n=3):
    return write_jsonl(tmp_path / name, [rr_record(f"hello {i}", answer="ok", session=f"g{i}") for i in range(n)])


def test_deeply_nested_line_is_quarantined_and_the_rest_kept(tmp_path):
    deep = '{"request": ' + "[" * 100_000 + "]" * 100_000 + "}"
    log = write_jsonl(tmp_path / "deep.jsonl", [rr_record("a", answer="b", session="s1"), deep,
                                                rr_record("c", answer="d", session="s2")])
    doc = tmp_path / "deep-doc.json"
    doc.write_text("[" + json.dumps(rr_record("e", answer="f", session="s3")) + ", " + "[" * 50_000 + "]" * 50_000 + "]")
    r, q = _collect(tmp_path / "ws", log, doc, _good(tmp_path))
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["invocations"] == 3 + 2 + 1
    assert q[("deep.jsonl", "line 2")]["code"] == "too_deep"
    assert q[("deep-doc.json", "index 1")]["code"] == "too_deep"


def test_corrupt_truncated_and_misnamed_gzip(tmp_path):
    body = "".join(json.dumps(rr_record(f"q{i}", answer="a", session=f"z{i}")) + "\n" for i in range(200)).encode()
    packed = gzip.compress(body)
    (tmp_path / "truncated.jsonl.gz").write_bytes(packed[: len(packed) // 2])
    (tmp_path / "garbage.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"\x00garbage" * 50)
    one = lambda s: (json.dumps(rr_record("renamed", answer="a", session=s)) + "\n").encode()  # noqa: E731
    (tmp_path / "plain-named.jsonl.gz").write_bytes(one("plain"))  # text behind a .gz name
    (tmp_path / "gzip-named.jsonl").write_bytes(gzip.compress(one("gz")))  # gzip without .gz
    (tmp_path / "not-gzip.json.gz").write_bytes(b"\x1f\x8b this is not gzip at all")
    _good(tmp_path)
    r, q = _collect(tmp_path / "ws", tmp_path)
    assert r.exit_code == 0, r.output
    kept = json.loads(r.stdout)["invocations"]
    trunc = [k for k in q if k[0] == "truncated.jsonl.gz"]
    assert len(trunc) == 1 and q[trunc[0]]["code"] in ("corrupt_gzip", "truncated")
    assert "gzip" in q[trunc[0]]["reason"] or "truncated" in q[trunc[0]]["reason"]
    assert q[("garbage.jsonl.gz", "file")]["code"] == "corrupt_gzip"
    assert q[("not-gzip.json.gz", "file")]["code"] == "corrupt_gzip"
    # 3 good + the two renamed one-liners + every complete line before the truncated gzip's cut
    lines_before_cut = int(trunc[0][1].split()[-1]) - 1 if trunc[0][1].startswith("line") else 0
    assert kept == 3 + 2 + lines_before_cut and lines_before_cut > 0


def test_utf16_with_bom_is_read(tmp_path):
    text = "".join(json.dumps(rr_record(f"grüße {i}", answer="ok", session=f"u{i}"), ensure_ascii=False) + "\n" for i in range(4))
    (tmp_path / "utf16.jsonl").write_bytes(text.encode("utf-16"))  # BOM + UTF-16-LE
    (tmp_path / "utf16be.json").write_bytes(b"\xfe\xff" + ("[" + text.strip().replace("\n", ",") + "]").encode("utf-16-be"))
    r, q = _collect(tmp_path / "ws", tmp_path)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["invocations"] == 4 and not q  # same records twice: the second copy is a duplicate
    invs = load_invocations(Workspace(tmp_path / "ws"), "collect")
    assert any("grüße" in m["content"] for i in invs for m in i.request.messages)


def test_jsonl_is_streamed_not_read_whole(tmp_path, monkeypatch):
    """No read of the whole file: the JSONL reader only asks for lines."""
    import slmconvert.collect.records as records

    log = _good(tmp_path, n=50)
    big_reads = []
    real_open = records.open_log

    def spy(path):
        f, enc, compressed = real_open(path)
        orig_read = f.read

        def read(n=-1):
            big_reads.append(n)
            return orig_read(n)

        f.read = read
        return f, enc, compressed

    monkeypatch.setattr(records, "open_log", spy)
    r, _ = _collect(tmp_path / "ws", log)
    assert r.exit_code == 0 and json.loads(r.stdout)["invocations"] == 50
    assert big_reads == []
