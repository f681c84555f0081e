"""In-process SLM serving under concurrency: requests of one adapter are generated together, and each
still gets its own answer (the one it gets alone)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from slmconvert.serve.engine import MicroBatcher
from slmconvert.workspace import Workspace


def test_the_batcher_groups_by_key_keeps_order_and_never_hangs():
    seen = []

    def run(items):
        seen.append([k for k, _ in items])
        time.sleep(0.05)
        if any(p == "boom" for _, p in items):
            raise RuntimeError("the model failed")
        return [f"{k}:{p}" for k, p in items]

    b = MicroBatcher(run, max_batch=4, wait_s=0.005)
    first = b.submit("a", 0)  # runs alone (50 ms) while the others queue up
    time.sleep(0.02)
    futs = [b.submit(k, i) for i, k in enumerate("ababab", start=1)]
    assert first.result(5) == "a:0"
    assert [f.result(5) for f in futs] == ["a:1", "b:2", "a:3", "b:4", "a:5", "b:6"]
    assert seen[0] == ["a"] and sorted(map(tuple, seen[1:])) == [("a", "a", "a"), ("b", "b", "b")]
    bad = [b.submit("c", "boom"), b.submit("c", 1)]
    for f in bad:
        with pytest.raises(RuntimeError, match="the model failed"):
            f.result(5)
    assert b.submit("c", 2).result(5) == "c:2"  # the worker lives on
    # a request cancelled while queued (its client left, or another copy answered first) is not run
    blocker = b.submit("d", 0)  # occupies the worker
    while not blocker.running():  # its batch is formed: what follows queues behind it
        time.sleep(0.001)
    dropped, kept = b.submit("d", "dropped"), b.submit("d", "kept")
    assert dropped.cancel() and blocker.result(5) == "d:0" and kept.result(5) == "d:kept"
    assert ["d"] in seen and all(len(batch) for batch in seen) and seen[-1] == ["d"]


def test_concurrent_requests_share_batches_and_get_their_own_answers(tuned_ws, tmp_path):
    import json

    import pyarrow.parquet as pq

    from slmconvert.evaluate.stage import run as evaluate
    from slmconvert.serve.engine import SlmEngine
    from slmconvert.store import load_invocations
    from tests.evaluate.conftest import copy_ws

    ws, cfg = copy_ws(tuned_ws, tmp_path)
    evaluate(cfg, Workspace(ws))
    assignments = pq.read_table(ws / "clusters" / "assignments.parquet").to_pylist()
    policy = json.loads((ws / "eval" / "policy.json").read_text())
    for site in policy["requests"]:
        policy["requests"][site]["min_similarity"] = None
        policy["rules"][site] = {"text": {"action": "slm", "min_confidence": None, "reason": "set by hand"}}
    (ws / "eval" / "policy.json").write_text(json.dumps(policy))
    by_id = {i.id: i for i in load_invocations(Workspace(ws), "collect")}
    site = sorted(policy["requests"])[0]
    requests = [by_id[a["invocation_id"]] for a in assignments if a["site"] == site][:6]
    alone = SlmEngine(cfg, Workspace(ws), max_new_tokens=6, batch_size=1)
    want = [alone.answer(r.request.messages, r.request.tools).response for r in requests]
    engine = SlmEngine(cfg, Workspace(ws), max_new_tokens=6, batch_size=8, batch_wait_ms=200)
    start = threading.Barrier(len(requests))

    def ask(r):
        start.wait()
        return engine.answer(r.request.messages, r.request.tools).response

    with ThreadPoolExecutor(len(requests)) as pool:
        got = list(pool.map(ask, requests))
    batches = [b for batcher in engine._batchers.values() for b in batcher.batches]
    assert max(batches) > 1 and sum(batches) == len(requests)  # generated together, every request once
    assert [(g.content, [(c.name, c.arguments) for c in g.tool_calls]) for g in got] == \
        [(w.content, [(c.name, c.arguments) for c in w.tool_calls]) for w in want]

    # The request gate's embeddings are batched too (GATE_WORKERS passes at once, the rest queue and go
    # together), and each request still gets the familiarity it gets alone.
    asked = [r.request.messages for r in requests] * 2
    want_sim = [alone.familiarity_of(site, m) for m in asked]
    assert all(isinstance(s, float) for s in want_sim)
    before = len(engine._gate.batches)
    start = threading.Barrier(len(asked))

    def gate(m):
        start.wait()
        return engine.familiarity_of(site, m)

    with ThreadPoolExecutor(len(asked)) as pool:
        got_sim = list(pool.map(gate, asked))
    assert got_sim == pytest.approx(want_sim, abs=1e-4)
    gate_batches = engine._gate.batches[before:]
    assert sum(gate_batches) == len(asked) and max(gate_batches) > 1


def test_the_onnx_gate_gives_torch_vectors_and_without_onnxruntime_serve_says_so(tuned_ws, tmp_path, monkeypatch):
    """serve.gate_runtime: ONNX Runtime embeds the request gate's texts to the vectors torch gives (the
    familiarity references were made with torch); where onnxruntime is missing, auto falls back to torch
    and says why, and onnx asked for explicitly is a clear error."""
    import sys

    import numpy as np

    from slmconvert import embeddings
    from slmconvert.errors import StageError
    from slmconvert.evaluate.stage import run as evaluate
    from slmconvert.serve.engine import SlmEngine
    from slmconvert.store import load_invocations
    from tests.evaluate.conftest import copy_ws

    pytest.importorskip("onnxruntime")
    ws, cfg = copy_ws(tuned_ws, tmp_path)
    cfg.evaluate.gate_encoder = "float"  # references of torch's vectors (int8 ones: the test below)
    evaluate(cfg, Workspace(ws))
    onnx = SlmEngine(cfg, Workspace(ws), max_new_tokens=4)
    torch_gate = SlmEngine(cfg, Workspace(ws), max_new_tokens=4, gate_runtime="torch")
    assert onnx.gate_runtime.startswith("onnx: ONNX Runtime") and torch_gate.gate_runtime.startswith("torch")
    texts = ["n1", "  Where is my order?  ", "Zoë's résumé 🙂", "a long tool result ORD-1234 " * 80, " "]
    encoder, _ = embeddings.OnnxEncoder.build(onnx.router.embedder)
    got, want = encoder.encode(texts), onnx.router.embedder.encode(texts)  # one padded batch, truncation included
    assert got.dtype == np.float32 and np.abs(got - want).max() < 1e-4
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    site = sorted(onnx.adapters)[0]
    for inv in load_invocations(Workspace(ws), "collect")[:8]:
        assert onnx.familiarity_of(site, inv.request.messages) == pytest.approx(torch_gate.familiarity_of(site, inv.request.messages), abs=1e-4)

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as on a machine without it
    fallback = SlmEngine(cfg, Workspace(ws), max_new_tokens=4)
    assert fallback.gate_runtime.startswith("torch (onnxruntime is not installed (pip install onnxruntime onnx")
    with pytest.raises(StageError, match="serve.gate_runtime is onnx, but onnxruntime is not installed"):
        SlmEngine(cfg, Workspace(ws), max_new_tokens=4, gate_runtime="onnx")


def test_a_gate_fitted_with_int8_vectors_is_served_with_them_and_reproduces_its_fitted_floor(tuned_ws, tmp_path):
    """evaluate.gate_encoder auto: the gate's references and thresholds come from the int8 ONNX model, which serve
    then embeds with: its familiarity of every calibration call is what evaluate scored, so the fitted floor (the
    k-th lowest calibration score) is reproduced to the rounding. Where serve's int8 vectors are not evaluate's,
    auto says so and embeds with float vectors; onnx refuses to start."""
    import json
    import math

    import numpy as np
    import pyarrow.parquet as pq

    from slmconvert.errors import StageError
    from slmconvert.evaluate.stage import FAMILIARITY, load_summary
    from slmconvert.evaluate.stage import run as evaluate
    from slmconvert.policy import Familiarity, split_sessions
    from slmconvert.serve.engine import SlmEngine
    from slmconvert.store import load_invocations
    from tests.evaluate.conftest import copy_ws

    pytest.importorskip("onnxruntime")
    ws, cfg = copy_ws(tuned_ws, tmp_path)
    evaluate(cfg, Workspace(ws))
    policy = json.loads((ws / "eval" / "policy.json").read_text())
    fitted = Familiarity.load(ws / "eval" / FAMILIARITY)
    assert policy["gate_encoder"]["id"] == fitted.encoder and fitted.encoder.startswith("onnx-int8:")
    engine = SlmEngine(cfg, Workspace(ws), max_new_tokens=4)
    assert engine.gate_runtime.startswith("onnx int8, as evaluate fitted the gate")
    asked_torch = SlmEngine(cfg, Workspace(ws), max_new_tokens=4, gate_runtime="torch")
    assert asked_torch.gate_runtime.startswith("torch (serve.gate_runtime) — the gate was fitted with int8 vectors, but serve.gate_runtime is torch")

    results = pq.read_table(ws / "eval" / "results.parquet").to_pylist()
    chosen = load_summary(Workspace(ws))["chosen_adapters"]
    wsp = Workspace(ws)
    by_id = {i.id: i for i in load_invocations(wsp, wsp.invocation_stage())}
    calibration, _ = split_sessions({r["session"] for r in results}, policy["split"]["seed"])
    checked = 0
    for site, gate in policy["requests"].items():
        rows = [r for r in results if r["site"] == site and r["variant"] == "finetuned" and r["model"] == chosen.get(site)
                and r["session"] in calibration and r["invocation_id"] in by_id]
        if gate["min_similarity"] is None or not rows:
            continue
        scores = sorted(engine.familiarity_of(site, by_id[r["invocation_id"]].request.messages) for r in rows)
        k = max(1, math.floor(gate["alpha"] * (len(scores) + 1)))
        assert scores[k - 1] == pytest.approx(gate["min_similarity"], abs=1e-4)
        checked += 1
    assert checked

    drifted = Familiarity(fitted.refs, fitted.encoder, fitted.probe + np.float32(0.01))  # as from another ONNX Runtime
    drifted.save(ws / "eval" / FAMILIARITY)
    fallback = SlmEngine(cfg, Workspace(ws), max_new_tokens=4)
    assert fallback.gate_runtime.startswith("onnx: ONNX Runtime") and "differ from evaluate's by 0.01" in fallback.gate_runtime
    assert "requests near its thresholds may be judged otherwise" in fallback.gate_runtime
    with pytest.raises(StageError, match="fitted with int8 ONNX vectors.*evaluate.gate_encoder=float"):
        SlmEngine(cfg, Workspace(ws), max_new_tokens=4, gate_runtime="onnx")


def test_the_onnx_gate_computes_no_padding_for_requests_of_different_lengths():
    """Requests that arrive together are embedded together, but each token length runs as its own pass: padding a
    short request to a long one's length doubled the gate's CPU under load. The vectors are torch's, in order."""
    import numpy as np

    from slmconvert import embeddings

    pytest.importorskip("onnxruntime")
    embedder = embeddings.Embedder(embeddings.DEFAULT_EMBEDDING_MODEL)
    encoder, why = embeddings.OnnxEncoder.build(embedder)
    assert encoder is not None, why
    texts = ["n1", "Where is my order ORD-1234? It was due on Monday.", "n2", "a long tool result ORD-1234 " * 80,
             "Zoë's résumé 🙂", "Where is my order ORD-9999? It was due on Friday."]
    passes = []
    real = encoder.session

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def run(self, outputs, feeds):
            passes.append(feeds["attention_mask"].copy())
            return real.run(outputs, feeds)

    encoder.session = Spy()
    try:
        got = encoder.encode(texts)
    finally:
        encoder.session = real
    lengths = [int(m.sum()) for m in embeddings._features(embedder.load(), texts)["attention_mask"][:, None]]
    assert len(passes) == len(set(lengths)) < len(texts)  # the two short ones and the two orders share a pass each
    assert all(m.all() for m in passes)  # no padding computed
    assert np.abs(got - embedder.encode(texts)).max() < 1e-4
    assert np.abs(got - np.vstack([encoder.encode([t]) for t in texts])).max() < 1e-5


def test_the_onnx_export_is_kept_per_weights_and_a_bad_kept_file_is_exported_again(tmp_path, monkeypatch):
    """serve starts without re-exporting the gate's model when the same weights were exported before (the
    user cache folder); a kept file that no longer loads is replaced, not trusted; other weights get their own."""
    import torch

    from slmconvert import embeddings

    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("SLMCONVERT_CACHE", str(tmp_path / "cache"))
    embedder = embeddings.Embedder(embeddings.DEFAULT_EMBEDDING_MODEL)
    texts = ["Where is my order ORD-1234?", "Zoë's résumé"]

    def fresh_build():
        monkeypatch.setattr(embeddings, "_ONNX", {})  # as a new serve process
        encoder, why = embeddings.OnnxEncoder.build(embedder)
        assert encoder is not None, why
        assert abs(encoder.encode(texts) - embedder.encode(texts)).max() < 1e-4
        return why

    assert "cached" not in fresh_build()
    kept = list((tmp_path / "cache" / "onnx").glob("*.onnx"))
    assert len(kept) == 1 and kept[0].stat().st_size > 1_000_000
    assert not [p for p in kept[0].parent.iterdir() if p.name.endswith(".tmp")]  # no half-written file left
    assert "cached export" in fresh_build()

    kept[0].write_bytes(b"not an onnx model")  # e.g. a cache folder copied half-way
    assert "cached" not in fresh_build()
    assert kept[0].stat().st_size > 1_000_000

    weights = embedder.load()[0].auto_model.embeddings.word_embeddings.weight
    before = embeddings._onnx_cache_path(embedder.load())
    with torch.no_grad():
        weights[0, 0] += 1.0
    try:
        assert embeddings._onnx_cache_path(embedder.load()) != before
    finally:
        with torch.no_grad():
            weights[0, 0] -= 1.0
    monkeypatch.setattr(embeddings, "_ONNX", {})
    int8, why = embeddings.OnnxEncoder.build(embedder, "int8")  # quantized from the kept float export, then kept too
    assert int8 is not None and "kept" not in why, why
    cosine = (int8.encode(texts) * embedder.encode(texts)).sum(axis=1)
    assert cosine.min() >= embeddings.INT8_MIN_COSINE and cosine.max() < 1 - 1e-4  # close to torch's, not torch's
    assert len(list((tmp_path / "cache" / "onnx").glob("*-int8-ort*.onnx"))) == 1
    monkeypatch.setattr(embeddings, "_ONNX", {})
    again, why = embeddings.OnnxEncoder.build(embedder, "int8")
    assert "kept model" in why and again.digest == int8.digest and abs(again.encode(texts) - int8.encode(texts)).max() == 0
    kept_int8 = next((tmp_path / "cache" / "onnx").glob("*-int8-ort*.onnx"))
    kept_int8.write_bytes(b"half a file")  # a kept model that no longer loads is quantized again, not trusted
    monkeypatch.setattr(embeddings, "_ONNX", {})
    redone, why = embeddings.OnnxEncoder.build(embedder, "int8")
    assert redone is not None and "kept" not in why and redone.digest == int8.digest and kept_int8.stat().st_size > 1_000_000

    monkeypatch.setenv("SLMCONVERT_ONNX_CACHE", "0")
    assert embeddings._onnx_cache_path(embedder.load()) is None
