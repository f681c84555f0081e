"""The issue's acceptance checks on real data: the τ-bench airline log alone, and mixed with the demo sample."""

from collections import Counter, defaultdict

import pytest

from slmconvert.workspace import Workspace
from tests.conftest import needs_tau

pytestmark = [needs_tau, pytest.mark.slow]


def test_mixed_agents_call_sites_and_router(clustered_mixed):
    from sklearn.metrics import adjusted_rand_score

    from slmconvert.cluster.stage import load_assignments
    from slmconvert.store import load_invocations

    ws, m = clustered_mixed
    true_site = {i.id: i.meta.get("workload_id", "tau-bench") for i in load_invocations(Workspace(ws))}
    rows = load_assignments(Workspace(ws))
    ari = adjusted_rand_score([true_site[r["invocation_id"]] for r in rows], [r["site"] for r in rows])
    print(f"mixed log: {len(rows)} invocations, ARI {ari:.3f}, router test accuracy {m.extra['router_test_accuracy']:.3f}")
    assert ari >= 0.95
    assert m.extra["router_test_accuracy"] >= 0.98


def test_taubench_one_site_tool_pure_tasks_and_labelled_text_tasks(clustered_tau):
    from slmconvert.cluster.stage import load_assignments, load_tasks
    from slmconvert.store import load_invocations

    ws, m = clustered_tau
    assert m.counts["embedded_new"] == 0
    assert m.counts["sites"] == 1

    tool_of = {i.id: (i.response.tool_calls[0].name if i.response.tool_calls else None) for i in load_invocations(Workspace(ws))}
    rows = load_assignments(Workspace(ws))
    per_task = defaultdict(Counter)
    for r in rows:
        per_task[r["task"]][tool_of[r["invocation_id"]]] += 1
    tool_tasks = {t: c for t, c in per_task.items() if t.startswith("tool:")}
    for task, c in tool_tasks.items():
        assert c.most_common(1)[0][1] / sum(c.values()) >= 0.95, task
    tools = {c.most_common(1)[0][0] for c in tool_tasks.values()}
    assert len(tools) == 14 and None not in tools

    doc = load_tasks(Workspace(ws))
    text = [t for s in doc["sites"].values() for t in s["tasks"] if t["kind"] == "text"]
    assert len(text) >= 3
    assert len({t["label"] for t in text}) == len(text)  # distinguishable labels
