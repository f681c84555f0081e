"""The real τ-bench airline log: the counts the dataset README documents."""

from slmconvert.collect.stage import run, summary
from slmconvert.store import load_invocations
from slmconvert.workspace import Workspace
from tests.conftest import TAU_BENCH, needs_tau


@needs_tau
def test_taubench_counts_and_prompt_reconstruction(tmp_path, collect_config):
    import json

    cfg = collect_config(TAU_BENCH)
    ws = Workspace(cfg.workspace)
    s = summary(run(cfg, ws), ws)
    assert (s["invocations"], s["tool_calls"], s["text"], s["sessions"]) == (2454, 1164, 1290, 200)
    assert len(s["tools"]) == 14 and "get_reservation_details" in s["tools"]
    assert s["quarantined"] == 0 and s["duplicates"] == 0
    # the workspace is smaller than the log: shared prompt prefixes are stored once
    size = sum(p.stat().st_size for p in ws.stage_dir("collect").iterdir())
    assert size < TAU_BENCH.stat().st_size

    # a stored prompt is exactly the conversation before that assistant message
    raw = json.loads(TAU_BENCH.read_text())
    invs = load_invocations(ws)
    traj = raw[7]["traj"]
    k = [j for j, m in enumerate(traj) if m["role"] == "assistant"][4]
    inv = next(i for i in invs if i.source.locator == f"index 7 message {k}")
    assert inv.step == 4
    assert [m["content"] for m in inv.request.messages] == [m["content"] for m in traj[:k]]
    expected = traj[k]
    if expected.get("tool_calls"):
        assert inv.response.tool_calls[0].arguments == json.loads(expected["tool_calls"][0]["function"]["arguments"])
    else:
        assert inv.response.content == expected["content"]
    assert run(cfg, ws).status == "skipped"
