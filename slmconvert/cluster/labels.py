"""Readable task labels from class-based TF-IDF (c-TF-IDF, as in BERTopic).

All documents of a class are one document; a term scores high when frequent in its class and
rare across classes: tf(t, c) * log(1 + A / f(t)), with A the mean number of words per class.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

# Tokens our masking and role prefixes put in texts; they say nothing about a task.
_NOISE = {"user", "assistant", "tool", "call", "system", "id", "date", "day", "email", "url",
          "null", "true", "false", "none"}


def ctfidf_terms(docs: Sequence[str], labels: Sequence[str], top_n: int = 5) -> dict[str, list[str]]:
    from sklearn.feature_extraction.text import CountVectorizer

    classes = sorted(set(labels))
    if not docs:
        return {c: [] for c in classes}
    joined = [" ".join(d for d, lab in zip(docs, labels) if lab == c) for c in classes]
    vec = CountVectorizer(stop_words="english", token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z]{2,}\b", lowercase=True,
                          max_features=50000)
    try:
        X = vec.fit_transform(joined).toarray().astype(np.float64)
    except ValueError:  # no usable words at all
        return {c: [] for c in classes}
    terms = vec.get_feature_names_out()
    keep = np.array([t not in _NOISE and not re.fullmatch(r"n+", t) for t in terms])
    X = X[:, keep]
    terms = terms[keep]
    tf = X / np.maximum(X.sum(axis=1, keepdims=True), 1)
    avg_words = X.sum() / max(len(classes), 1)
    idf = np.log(1 + avg_words / np.maximum(X.sum(axis=0), 1))
    score = tf * idf
    out = {}
    for i, c in enumerate(classes):
        top = np.argsort(-score[i], kind="stable")[:top_n]
        out[c] = [str(terms[j]) for j in top if score[i, j] > 0]
    return out
