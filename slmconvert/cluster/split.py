"""The train/test split: by session (no conversation on both sides), stratified by task, seeded.

Sessions that already have a side keep it on later runs, so that new logs never move a test
conversation into training (adapters trained before stay honest); only new sessions are split.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections import Counter
from collections.abc import Sequence

import numpy as np


def _seeded_order(groups: Sequence[str], seed: int) -> list[str]:
    return sorted(groups, key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())


def session_split(sessions: Sequence[str], tasks: Sequence[str], test_fraction: float, seed: int,
                  previous: dict[str, str] | None = None) -> list[str]:
    """'train' or 'test' per row. `sessions` are group keys (one per row), `tasks` the strata."""
    previous = previous or {}
    side: dict[str, str] = {s: previous[s] for s in set(sessions) if s in previous}
    new_rows = [i for i, s in enumerate(sessions) if s not in side]
    new_groups = sorted({sessions[i] for i in new_rows})
    n_splits = max(2, round(1 / test_fraction)) if test_fraction > 0 else 0
    if test_fraction <= 0 or not new_groups:
        side.update({g: "train" for g in new_groups})
    elif len(new_groups) < max(n_splits, 2) or len(new_groups) < 5:
        # Too few conversations to stratify: a seeded share of whole sessions goes to test.
        order = _seeded_order(new_groups, seed)
        n_test = min(len(order) - 1, math.ceil(test_fraction * len(order))) if len(order) > 1 else 0
        side.update({g: ("test" if i < n_test else "train") for i, g in enumerate(order)})
    else:
        from sklearn.model_selection import StratifiedGroupKFold

        y = np.array([tasks[i] for i in new_rows])
        g = np.array([sessions[i] for i in new_rows])
        # Tasks rarer than n_splits cannot be stratified; scikit-learn warns, the split is still by session.
        counts = Counter(y)
        y = np.array([t if counts[t] >= n_splits else "<rare>" for t in y])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
            _, test_idx = next(folds.split(np.zeros(len(y)), y, g))
        test_groups = set(g[test_idx])
        side.update({grp: ("test" if grp in test_groups else "train") for grp in new_groups})
    return [side[s] for s in sessions]
