"""Estimators in the scikit-learn style: `__init__` stores parameters, `fit` validates and sets
the fitted attributes (trailing underscore), `predict` checks it was fitted.

- `TaskClusterer`: groups embedded replies into tasks (KMeans with k chosen by silhouette, or
  HDBSCAN after PCA, noise points joined to their nearest cluster).
- `SiteClusterer`: groups request templates into call sites (agglomerative, on a distance that
  mixes template text similarity and tool-set overlap).
- `SiteRouter`: maps request features to a call site (logistic regression; one site → constant).
"""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, ClusterMixin
from sklearn.utils.validation import check_is_fitted


def _check_param(owner: str, name: str, value, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"The '{name}' parameter of {owner} must be {expected}. Got {value!r} instead.")


def _check_matrix(X, owner: str, min_samples: int = 1) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"{owner} expects a 2-D array of shape (n_samples, n_features). Got shape {X.shape} instead.")
    if X.shape[0] < min_samples:
        raise ValueError(f"{owner} needs at least {min_samples} sample(s). Got {X.shape[0]} instead.")
    return X


class TaskClusterer(ClusterMixin, BaseEstimator):
    """Cluster embeddings into tasks with an automatic number of clusters.

    method="kmeans": k in [k_min, k_max] (bounded so that clusters average >= min_cluster_size)
    by silhouette (on a sample of at most `silhouette_sample` points): the largest k whose score
    is within `silhouette_tolerance` (relative) of the best. Sentence embeddings give a flat
    silhouette curve, and the smallest k is then rarely the useful one; tasks that are nearly as
    well separated but finer give per-task verdicts more bite. When no k reaches
    `min_silhouette`, or the points are (nearly) identical, everything is one task.
    method="hdbscan": PCA to `pca_components` dimensions, then HDBSCAN; noise joins the nearest cluster.
    """

    def __init__(self, method: str = "kmeans", k_min: int = 2, k_max: int = 12, min_cluster_size: int = 5,
                 min_silhouette: float = 0.05, silhouette_tolerance: float = 0.05, pca_components: int = 20, silhouette_sample: int = 3000,
                 random_state: int | None = 0):
        self.method = method
        self.k_min = k_min
        self.k_max = k_max
        self.min_cluster_size = min_cluster_size
        self.min_silhouette = min_silhouette
        self.silhouette_tolerance = silhouette_tolerance
        self.pca_components = pca_components
        self.silhouette_sample = silhouette_sample
        self.random_state = random_state

    def _validate_params(self) -> None:
        name = type(self).__name__
        _check_param(name, "method", self.method, self.method in ("kmeans", "hdbscan"), "'kmeans' or 'hdbscan'")
        for p in ("k_min", "k_max", "min_cluster_size", "pca_components"):
            v = getattr(self, p)
            _check_param(name, p, v, isinstance(v, Integral) and v >= (2 if p != "pca_components" else 1), "an int >= 2" if p != "pca_components" else "an int >= 1")
        _check_param(name, "k_max", self.k_max, self.k_max >= self.k_min, f"an int >= k_min ({self.k_min})")
        _check_param(name, "min_silhouette", self.min_silhouette, isinstance(self.min_silhouette, Real) and -1 <= self.min_silhouette <= 1, "a float in [-1, 1]")

    def fit(self, X, y=None):
        self._validate_params()
        X = _check_matrix(X, type(self).__name__)
        n = X.shape[0]
        self.silhouette_ = None
        self.scores_ = {}
        distinct = np.unique(np.round(X, 4), axis=0).shape[0]
        k_hi = min(self.k_max, n // self.min_cluster_size, distinct)
        if k_hi < 2:
            labels = np.zeros(n, dtype=int)
        elif self.method == "kmeans":
            labels = self._fit_kmeans(X, max(2, self.k_min), k_hi)
        else:
            labels = self._fit_hdbscan(X)
        self._set_fitted(X, labels)
        return self

    def _fit_kmeans(self, X: np.ndarray, k_lo: int, k_hi: int) -> np.ndarray:
        from sklearn.cluster import KMeans
        from sklearn.metrics import silhouette_score

        fits: dict[int, tuple[np.ndarray, float]] = {}
        sample = min(self.silhouette_sample, X.shape[0])
        for k in range(k_lo, k_hi + 1):
            km = KMeans(n_clusters=k, n_init=4, random_state=self.random_state).fit(X)
            labels = self._merge_small(X, km.labels_)
            if len(set(labels)) < 2 or any(len(set(v[0])) == len(set(labels)) for v in fits.values()):
                continue  # one cluster left, or the same number of clusters as a smaller k after merging
            score = float(silhouette_score(X, labels, sample_size=sample, random_state=self.random_state))
            self.scores_[k] = round(score, 4)
            fits[k] = (labels, score)
        best_score = max((s for _, s in fits.values()), default=-1.0)
        if not fits or best_score < self.min_silhouette:
            return np.zeros(X.shape[0], dtype=int)
        k = max(k for k, (_, s) in fits.items() if s >= best_score - abs(best_score) * self.silhouette_tolerance)
        self.silhouette_ = fits[k][1]
        return fits[k][0]

    def _merge_small(self, X: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Clusters under `min_cluster_size` join the nearest large one (a task of 2 calls gets no verdict worth having)."""
        labels = labels.copy()
        while True:
            ids, counts = np.unique(labels, return_counts=True)
            small = ids[counts < self.min_cluster_size]
            big = ids[counts >= self.min_cluster_size]
            if len(small) == 0 or len(big) == 0:
                return labels
            centers = np.stack([X[labels == c].mean(axis=0) for c in big])
            victim = small[np.argmin(counts[counts < self.min_cluster_size])]
            m = labels == victim
            labels[m] = big[np.argmax(X[m] @ centers.T, axis=1)]

    def _fit_hdbscan(self, X: np.ndarray) -> np.ndarray:
        from sklearn.cluster import HDBSCAN
        from sklearn.decomposition import PCA

        dims = min(self.pca_components, X.shape[1], X.shape[0] - 1)
        Z = PCA(n_components=dims, random_state=self.random_state).fit_transform(X) if dims >= 2 else X
        labels = HDBSCAN(min_cluster_size=self.min_cluster_size, copy=True).fit_predict(Z)
        self.noise_ = int((labels < 0).sum())
        if (labels >= 0).sum() == 0:
            return np.zeros(X.shape[0], dtype=int)
        ids = sorted(set(labels[labels >= 0]))
        centers = np.stack([X[labels == c].mean(axis=0) for c in ids])
        noise = labels < 0
        if noise.any():
            labels = labels.copy()
            labels[noise] = np.asarray(ids)[np.argmax(X[noise] @ centers.T, axis=1)]
        return labels

    def _set_fitted(self, X: np.ndarray, labels: np.ndarray) -> None:
        # Renumber by decreasing size so that label 0 is the largest task (stable names across runs).
        ids, counts = np.unique(labels, return_counts=True)
        order = ids[np.argsort(-counts, kind="stable")]
        remap = {old: new for new, old in enumerate(order)}
        self.labels_ = np.array([remap[v] for v in labels], dtype=int)
        self.n_clusters_ = len(order)
        centers = np.stack([X[self.labels_ == c].mean(axis=0) for c in range(self.n_clusters_)])
        self.cluster_centers_ = centers / np.maximum(np.linalg.norm(centers, axis=1, keepdims=True), 1e-12)

    def predict(self, X) -> np.ndarray:
        check_is_fitted(self, "cluster_centers_")
        X = _check_matrix(X, type(self).__name__)
        return np.argmax(X @ self.cluster_centers_.T, axis=1)


class SiteClusterer(ClusterMixin, BaseEstimator):
    """Group distinct request templates into call sites.

    Distance between two templates: the mean of (1 - cosine similarity of their text vectors)
    and the Jaccard distance of their tool-name sets. Average-linkage agglomerative clustering
    cut at `distance_threshold`. `fit(X, y=tool_sets)`: X are L2-normalised text vectors.
    More than `max_templates` templates: a sample is clustered and the rest join the nearest site.
    """

    def __init__(self, distance_threshold: float = 0.35, max_templates: int = 2000, random_state: int | None = 0):
        self.distance_threshold = distance_threshold
        self.max_templates = max_templates
        self.random_state = random_state

    def fit(self, X, y=None):
        name = type(self).__name__
        _check_param(name, "distance_threshold", self.distance_threshold,
                     isinstance(self.distance_threshold, Real) and 0 < self.distance_threshold < 1, "a float in (0, 1)")
        X = _check_matrix(X, name)
        tools = [frozenset(t) for t in (y if y is not None else [()] * X.shape[0])]
        n = X.shape[0]
        if n == 1:
            labels = np.zeros(1, dtype=int)
        else:
            from sklearn.cluster import AgglomerativeClustering

            rng = np.random.default_rng(self.random_state)
            fit_idx = np.sort(rng.choice(n, self.max_templates, replace=False)) if n > self.max_templates else np.arange(n)
            D = self._distances(X[fit_idx], [tools[i] for i in fit_idx], X[fit_idx], [tools[i] for i in fit_idx])
            sub = AgglomerativeClustering(n_clusters=None, metric="precomputed", linkage="average",
                                          distance_threshold=self.distance_threshold).fit_predict(D)
            labels = np.empty(n, dtype=int)
            labels[fit_idx] = sub
            rest = np.setdiff1d(np.arange(n), fit_idx)
            if len(rest):
                Dr = self._distances(X[rest], [tools[i] for i in rest], X[fit_idx], [tools[i] for i in fit_idx])
                labels[rest] = sub[np.argmin(Dr, axis=1)]
        self.labels_ = labels
        self.n_clusters_ = int(labels.max()) + 1
        return self

    @staticmethod
    def _distances(A: np.ndarray, ta: list[frozenset], B: np.ndarray, tb: list[frozenset]) -> np.ndarray:
        text = 1.0 - np.clip(A @ B.T, -1.0, 1.0)
        jac = np.empty((len(ta), len(tb)), dtype=np.float32)
        for i, s in enumerate(ta):
            for j, t in enumerate(tb):
                union = len(s | t)
                jac[i, j] = 0.0 if union == 0 else 1.0 - len(s & t) / union
        D = (text + jac) / 2.0
        if A is B or (A.shape == B.shape and np.array_equal(A, B)):
            np.fill_diagonal(D, 0.0)
        return np.maximum(D, 0.0)


class SiteRouter(ClassifierMixin, BaseEstimator):
    """Request features -> call site. Logistic regression; a single site gives a constant router."""

    def __init__(self, C: float = 10.0, max_iter: int = 2000, random_state: int | None = 0):
        self.C = C
        self.max_iter = max_iter
        self.random_state = random_state

    def fit(self, X, y):
        _check_param(type(self).__name__, "C", self.C, isinstance(self.C, Real) and self.C > 0, "a float > 0")
        X = _check_matrix(X, type(self).__name__)
        y = np.asarray(y)
        if len(y) != X.shape[0]:
            raise ValueError(f"{type(self).__name__}.fit: X has {X.shape[0]} rows but y has {len(y)} labels.")
        self.classes_ = np.unique(y)
        if len(self.classes_) == 1:
            self.model_ = None
        else:
            from sklearn.linear_model import LogisticRegression

            self.model_ = LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=self.random_state).fit(X, y)
            self.classes_ = self.model_.classes_
        return self

    def predict_proba(self, X) -> np.ndarray:
        check_is_fitted(self, "classes_")
        X = _check_matrix(X, type(self).__name__)
        if self.model_ is None:
            return np.ones((X.shape[0], 1))
        return self.model_.predict_proba(X)

    def predict(self, X) -> np.ndarray:
        check_is_fitted(self, "classes_")
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]
