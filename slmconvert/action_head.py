"""The action head: which tool an SLM's call names, chosen by a classifier fitted on the site's logged calls.

A small model writes a tool's arguments well once it has the right tool, but picking the LLM's next tool from a
long conversation is where it fails most (SmolLM2-135M on τ-bench names the LLM's tool in about half of the calls).
The agent's own traffic says a lot about that choice: a logistic regression over the turn that prompts the call (the
text the request gate already embeds, `slmconvert.policy.request_text`) and the agent's last two actions (tool
names, or a text reply) names the LLM's tool in about 3 of 4 held-out calls there (README).

With `evaluate.tool_choice: head`, the grammar of a call the SLM decodes lets it call only the head's tool (a text
reply stays allowed: whether to call a tool at all is still the SLM's decision, and the arguments are the SLM's). The
head is fitted by `evaluate` on the train split's tool calls of each site, its accuracy measured on every test tool
call, and saved beside the routing policy (`eval/action_head.joblib`), which `serve` applies with the vectors the
request gate computes anyway (fitted with the same encoder, `slmconvert.embeddings.GateEncoder`).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from slmconvert.io import atomic_path
from slmconvert.progress import NULL_PROGRESS, Progress

HEAD_FILE = "action_head.joblib"
VERSION = "action-head-v1"  # part of evaluate's generation keys through the narrowed grammars; raise on a change of features
MIN_CALLS = 20  # a site's head needs this many training tool calls, of at least two tools
REGULARISATION_C = 4.0  # inverse L2 strength of the logistic regression (sklearn's C); 1-10 all within 0.02 on τ-bench
NO_ACTION = "<none>"
TEXT_ACTION = "<text>"


def previous_actions(messages: Sequence[dict]) -> list[str]:
    """The agent's earlier actions in the conversation, oldest first: each assistant turn's tool names, or `<text>`."""
    out: list[str] = []
    for m in messages:
        if m.get("role") != "assistant":
            continue
        calls = m.get("tool_calls") or []
        names = [((c.get("function") or c).get("name") if isinstance(c, dict) else None) for c in calls]
        out += [n for n in names if isinstance(n, str)] or [TEXT_ACTION]
    return out


def context_features(messages: Sequence[dict]) -> dict[str, float]:
    """The categorical features: who spoke last (a user or tool results) and the agent's last two actions."""
    acts = previous_actions(messages)
    last = messages[-1].get("role") if messages else None
    return {f"last={last}": 1.0, f"prev={acts[-1] if acts else NO_ACTION}": 1.0,
            f"prev2={acts[-2] if len(acts) > 1 else NO_ACTION}": 1.0}


class ActionHead:
    """Per site, a DictVectorizer of the context features and a logistic regression over [gate vector, features]."""

    def __init__(self, sites: dict[str, tuple[Any, Any]], encoder: str, meta: dict[str, dict[str, Any]]):
        self.sites, self.encoder, self.meta = sites, encoder, meta
        self._linear: dict[str, tuple] = {}

    def _weights(self, site: str) -> tuple:
        """The site's fitted model as arrays (classes, feature index, embedding and feature weights, intercepts): serve
        scores a request with them in 0.7 ms where predict_proba with sklearn's checks took 5 ms (both measured on a busy
        2-core machine, features included)."""
        if site not in self._linear:
            dv, clf = self.sites[site]
            dims = clf.coef_.shape[1] - len(dv.feature_names_)
            self._linear[site] = ([str(c) for c in clf.classes_], {f: dims + j for f, j in dv.vocabulary_.items()},
                                  np.asarray(clf.coef_, dtype=np.float64), np.asarray(clf.intercept_, dtype=np.float64), dims)
        return self._linear[site]

    def probabilities(self, site: str, vectors: np.ndarray, messages: Sequence[Sequence[dict]]) -> tuple[list[str], np.ndarray]:
        """The site's classes and, per request, predict_proba's probabilities of them (the same numbers, computed here)."""
        classes, index, coef, intercept, dims = self._weights(site)
        z = np.asarray(vectors, dtype=np.float64) @ coef[:, :dims].T + intercept
        for row, m in enumerate(messages):
            cols = [index[f] for f in context_features(m) if f in index]
            if cols:
                z[row] += coef[:, cols].sum(axis=1)
        if coef.shape[0] == 1:  # two classes: sklearn's binary model, the second class's log-odds
            p1 = 1.0 / (1.0 + np.exp(-z[:, 0]))
            return classes, np.stack([1.0 - p1, p1], axis=1)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return classes, e / e.sum(axis=1, keepdims=True)

    def known(self, site: str) -> frozenset[str]:
        """The tools the site's head can pick: those called in its training calls."""
        return frozenset(self.sites[site][1].classes_) if site in self.sites else frozenset()

    def choose(self, site: str, vectors: np.ndarray, messages: Sequence[Sequence[dict]],
               offered: Sequence[Sequence[str] | None]) -> list[tuple[str | None, float | None]]:
        """Per request, the head's tool among the names `offered` (None: no tools) and its probability renormalised over
        them; (None, None) where the site has no head, nothing offered is a tool it knows, or only one tool is offered."""
        if site not in self.sites or not len(messages):
            return [(None, None)] * len(messages)
        classes, proba = self.probabilities(site, vectors, messages)
        at = {c: k for k, c in enumerate(classes)}
        out: list[tuple[str | None, float | None]] = []
        for row, names in zip(proba, offered):
            known = [(float(row[at[n]]), n) for n in dict.fromkeys(names or []) if n in at]
            if len(set(names or [])) < 2 or not known:
                out.append((None, None))
                continue
            total = sum(p for p, _ in known) or 1.0
            p, name = max(known)
            out.append((name, p / total))
        return out

    def save(self, path: Path) -> None:
        import joblib

        with atomic_path(path) as tmp:
            joblib.dump({"version": VERSION, "sites": self.sites, "encoder": self.encoder, "meta": self.meta}, tmp)

    @staticmethod
    def load(path: Path) -> "ActionHead | None":
        """The saved head, or None when there is none, it is damaged, or another version of the features wrote it."""
        import joblib

        if not path.exists():
            return None
        try:
            bundle = joblib.load(path)  # our own file, written by `evaluate` in this workspace
        except Exception:  # noqa: BLE001 - a damaged file is as good as none: the caller says to re-run evaluate
            return None
        if not isinstance(bundle, dict) or bundle.get("version") != VERSION:
            return None
        return ActionHead(bundle["sites"], bundle["encoder"], bundle["meta"])


def _tool_calls(invs: Sequence[Any]) -> list[Any]:
    return [i for i in invs if i.response.tool_calls]


def fit_action_heads(gate, train_by_site: dict[str, list], test_by_site: dict[str, list], cache=None,
                     progress: Progress = NULL_PROGRESS) -> ActionHead:
    """A head per site with at least MIN_CALLS training tool calls of two or more tools (its first call's tool is the
    label), each measured on every test tool call of the site: `meta[site]` holds the counts, sessions and accuracy
    (and, for comparison, always naming the site's most frequent tool). Embedded by `gate` as serve will embed."""
    from sklearn.feature_extraction import DictVectorizer
    from sklearn.linear_model import LogisticRegression

    from slmconvert.embeddings import embed_texts
    from slmconvert.policy import request_text

    sites: dict[str, tuple[Any, Any]] = {}
    meta: dict[str, dict[str, Any]] = {}
    for site, invs in sorted(train_by_site.items()):
        train = _tool_calls(invs)
        labels = [i.response.tool_calls[0].name for i in train]
        counts = Counter(labels)
        if not train:  # a site that never calls a tool: nothing to name, nothing to say
            continue
        if len(train) < MIN_CALLS or len(counts) < 2:
            meta[site] = {"fitted": False, "train_calls": len(train), "tools": len(counts),
                          "why": f"needs {MIN_CALLS} training tool calls of two or more tools"}
            continue
        vecs, _ = embed_texts([request_text(i.request.messages) for i in train], gate, cache, progress,
                              f"embedding {site}'s training calls for the action head")
        dv = DictVectorizer(sparse=False).fit([context_features(i.request.messages) for i in train])
        clf = LogisticRegression(C=REGULARISATION_C, max_iter=3000)
        clf.fit(np.hstack([vecs, dv.transform([context_features(i.request.messages) for i in train])]), labels)
        sites[site] = (dv, clf)
        meta[site] = {"fitted": True, "train_calls": len(train), "train_sessions": len({i.session_id for i in train}),
                      "tools": len(counts)}
    head = ActionHead(sites, gate.id, meta)
    for site in sites:
        test = _tool_calls(test_by_site.get(site, []))
        if not test:
            continue
        vecs, _ = embed_texts([request_text(i.request.messages) for i in test], gate, cache, progress,
                              f"embedding {site}'s test calls for the action head")
        chosen = head.choose(site, vecs, [i.request.messages for i in test],
                             [[t.get("function", t).get("name") for t in (i.request.tools or [])] or list(sites[site][1].classes_)
                              for i in test])
        truth = [i.response.tool_calls[0].name for i in test]
        frequent = Counter(i.response.tool_calls[0].name for i in _tool_calls(train_by_site[site])).most_common(1)[0][0]
        meta[site].update({"test_calls": len(test), "test_sessions": len({i.session_id for i in test}),
                           "accuracy": round(sum(c == t for (c, _), t in zip(chosen, truth)) / len(test), 4),
                           "most_frequent_accuracy": round(sum(t == frequent for t in truth) / len(test), 4)})
    return head


def narrow_specs(specs: list[tuple[str, dict]], name: str | None, known: set[str] | frozenset[str] = frozenset()
                 ) -> list[tuple[str, dict]]:
    """A grammar's offered tools (name, schema) narrowed to the head's pick (all of them where it has none), keeping
    any tool the head does not `know` (never called in its training calls: added to the agent since, say), on which it
    has no say."""
    kept = [(n, s) for n, s in specs if n == name or n not in known] if name is not None else []
    return kept or specs
