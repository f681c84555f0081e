"""The router: an OpenAI-style request (messages + tools) -> its call site, with a confidence.

Features are the request's masked instruction template (embedded) and its tool names (hashed),
the same request-only features the call sites were found from. The router is saved in the
workspace (`clusters/router.joblib` + a readable `router.json`) for `evaluate` and `serve`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from slmconvert.cluster.estimators import SiteRouter
from slmconvert.cluster.features import request_signature
from slmconvert.embeddings import Embedder, EmbeddingCache, embed_texts
from slmconvert.errors import StageError
from slmconvert.io import atomic_path, read_json, write_json_atomic
from slmconvert.progress import NULL_PROGRESS, Progress

ROUTER_FILE = "router.joblib"
ROUTER_META = "router.json"
TOOL_DIMS = 256
TOOL_WEIGHT = 1.0


def tool_features(tool_sets: Sequence[Sequence[str]]) -> np.ndarray:
    from sklearn.feature_extraction import FeatureHasher

    hasher = FeatureHasher(n_features=TOOL_DIMS, input_type="string", alternate_sign=False)
    M = hasher.transform([list(t) or ["<no-tools>"] for t in tool_sets]).toarray().astype(np.float32)
    norms = np.linalg.norm(M, axis=1, keepdims=True)
    return TOOL_WEIGHT * M / np.maximum(norms, 1e-12)


def request_features(templates: Sequence[str], tool_sets: Sequence[Sequence[str]], embedder: Embedder,
                     cache: EmbeddingCache | None = None, progress: Progress = NULL_PROGRESS) -> np.ndarray:
    vecs, _ = embed_texts(list(templates), embedder, cache, progress, label="embedding templates")
    return np.hstack([vecs, tool_features(tool_sets)])


ROUTE_MEMO = 4096  # request signatures whose routing a Router keeps


class Router:
    def __init__(self, estimator: SiteRouter, embedding_model: str, meta: dict[str, Any] | None = None,
                 max_seq_length: int | None = None):
        self.estimator = estimator
        self.embedder = Embedder(embedding_model, max_seq_length=max_seq_length)
        self.meta = meta or {}
        # signature -> (site, probability): a serving process sees the same few system prompts and tool sets
        # over and over; bounded, least recently used first out, for agents whose system prompts vary.
        self._memo: OrderedDict[tuple, tuple[str, float]] = OrderedDict()
        self._memo_lock = threading.Lock()

    @property
    def sites(self) -> list[str]:
        return [str(c) for c in self.estimator.classes_]

    def route_many(self, requests: Sequence[tuple[list[dict], list[dict] | None]]) -> list[tuple[str, float]]:
        sigs = [request_signature(m, t) for m, t in requests]
        distinct = list(dict.fromkeys(sigs))
        with self._memo_lock:
            known = {s: self._memo[s] for s in distinct if s in self._memo}
            for s in known:
                self._memo.move_to_end(s)
        missing = [s for s in distinct if s not in known]
        if missing:
            X = request_features([s[0] for s in missing], [s[1] for s in missing], self.embedder)
            proba = self.estimator.predict_proba(X)
            best = np.argmax(proba, axis=1)
            routed = {s: (str(self.estimator.classes_[b]), float(proba[i, b])) for i, (s, b) in enumerate(zip(missing, best))}
            known.update(routed)
            with self._memo_lock:
                self._memo.update(routed)
                while len(self._memo) > ROUTE_MEMO:
                    self._memo.popitem(last=False)
        return [known[s] for s in sigs]

    def route(self, messages: list[dict], tools: list[dict] | None = None) -> tuple[str, float]:
        return self.route_many([(messages, tools)])[0]

    def save(self, folder: Path) -> list[str]:
        import joblib

        with atomic_path(folder / ROUTER_FILE) as tmp:
            joblib.dump({"estimator": self.estimator, "embedding_model": self.embedder.name,
                         "max_seq_length": self.embedder.max_seq_length}, tmp)
        write_json_atomic(folder / ROUTER_META, {"embedding_model": self.embedder.name, "sites": self.sites,
                                                 "max_seq_length": self.embedder.max_seq_length,
                                                 "tool_dims": TOOL_DIMS, **self.meta})
        return [ROUTER_FILE, ROUTER_META]


def load_router(folder: Path) -> Router:
    import joblib

    path = Path(folder) / ROUTER_FILE
    if not path.exists():
        raise StageError(f"no router in {folder}: run `slmconvert cluster` first")
    bundle = joblib.load(path)  # our own file, written by `cluster` in this workspace
    meta = read_json(Path(folder) / ROUTER_META) if (Path(folder) / ROUTER_META).exists() else {}
    return Router(bundle["estimator"], bundle["embedding_model"], meta, bundle.get("max_seq_length"))
