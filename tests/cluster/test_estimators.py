"""The estimators behave like scikit-learn's: parameters checked at fit, fitted attributes, predict after fit."""

import numpy as np
import pytest
from sklearn.exceptions import NotFittedError

from slmconvert.cluster.estimators import SiteClusterer, SiteRouter, TaskClusterer


def blobs(k=3, n=30, dim=16, seed=0, spread=0.05):
    rng = np.random.default_rng(seed)
    centers = np.eye(dim)[:k]
    X = np.concatenate([c + spread * rng.standard_normal((n, dim)) for c in centers])
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X.astype(np.float32), np.repeat(np.arange(k), n)


@pytest.mark.parametrize("method", ["kmeans", "hdbscan"])
def test_task_clusterer_recovers_separated_groups(method):
    from sklearn.metrics import adjusted_rand_score

    X, truth = blobs(k=3)
    est = TaskClusterer(method=method, random_state=0).fit(X)
    assert est.n_clusters_ == 3
    assert adjusted_rand_score(truth, est.labels_) == 1.0
    # label 0 is the largest cluster; predict maps a point to its cluster
    assert (est.predict(X) == est.labels_).all()


def test_identical_points_are_one_task():
    X = np.tile(np.eye(8, dtype=np.float32)[0], (40, 1))
    est = TaskClusterer().fit(X)
    assert est.n_clusters_ == 1 and set(est.labels_) == {0}


def test_small_clusters_join_a_large_one():
    X, _ = blobs(k=2, n=30)
    stray = np.eye(16, dtype=np.float32)[5][None, :].repeat(2, axis=0)  # 2 points far from both
    est = TaskClusterer(min_cluster_size=5, k_max=4).fit(np.vstack([X, stray]))
    sizes = np.bincount(est.labels_)
    assert sizes.min() >= 5 and est.n_clusters_ == 2


def test_bad_parameter_message_names_parameter_and_value():
    with pytest.raises(ValueError, match=r"The 'method' parameter of TaskClusterer must be 'kmeans' or 'hdbscan'. Got 'dbscan' instead."):
        TaskClusterer(method="dbscan").fit(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="k_max"):
        TaskClusterer(k_min=5, k_max=3).fit(np.zeros((4, 2)))


def test_predict_before_fit_fails_clearly():
    with pytest.raises(NotFittedError):
        TaskClusterer().predict(np.zeros((2, 2)))
    with pytest.raises(NotFittedError):
        SiteRouter().predict(np.zeros((2, 2)))


def test_site_clusterer_uses_text_and_tools():
    e = np.eye(8, dtype=np.float32)
    near = (e[0] + 0.05 * e[1]) / np.linalg.norm(e[0] + 0.05 * e[1])
    X = np.stack([e[0], near, e[0], e[2]])
    tools = [{"a", "b"}, {"a", "b"}, {"x"}, {"a", "b"}]
    labels = SiteClusterer(distance_threshold=0.35).fit(X, tools).labels_
    assert labels[0] == labels[1]          # same tools, nearly the same template
    assert labels[2] != labels[0]          # same template, other tools
    assert labels[3] != labels[0]          # same tools, another template


def test_site_clusterer_large_input_is_sampled_then_assigned():
    X, truth = blobs(k=2, n=60, spread=0.01)
    labels = SiteClusterer(max_templates=20, random_state=1).fit(X, [set()] * len(X)).labels_
    assert len(set(labels)) == 2
    assert all(len(set(labels[truth == k])) == 1 for k in (0, 1))


def test_router_single_site_is_constant_and_multi_site_learns():
    X, y = blobs(k=3)
    one = SiteRouter().fit(X, np.array(["only"] * len(X)))
    assert set(one.predict(X)) == {"only"} and one.predict_proba(X).shape == (len(X), 1)
    names = np.array(["a", "b", "c"])[y]
    r = SiteRouter().fit(X, names)
    assert (r.predict(X) == names).mean() == 1.0
    assert np.allclose(r.predict_proba(X).sum(axis=1), 1.0)
