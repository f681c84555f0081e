from slmconvert.collect.stage import run
from slmconvert.demo import generate
from slmconvert.store import load_invocations
from slmconvert.workspace import Workspace


def test_demo_data_is_seeded_multi_agent_and_collects_cleanly(tmp_path, collect_config):
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    generate(a, sessions=30, seed=1)
    generate(b, sessions=30, seed=1)
    generate(c, sessions=30, seed=2)
    assert a.read_bytes() == b.read_bytes() and a.read_bytes() != c.read_bytes()

    cfg = collect_config(a)
    ws = Workspace(cfg.workspace)
    m = run(cfg, ws)
    assert m.counts["quarantined"] == 0 and m.counts["sessions"] == 30
    invs = load_invocations(ws)
    systems = {i.request.messages[0]["content"].split(".")[0] for i in invs}
    assert len({i.meta["workload_id"] for i in invs}) == 3 and len(systems) >= 3
    assert m.counts["tool_calls"] > 0 and m.counts["text"] > 0
    toolsets = {tuple(sorted(t["function"]["name"] for t in i.request.tools or [])) for i in invs}
    assert len(toolsets) == 3  # two tool sets and one call site without tools
    # fake PII sits in user turns and in tool results
    tool_results = [msg["content"] for i in invs for msg in i.request.messages if msg["role"] == "tool"]
    assert any("@" in r and "phone" in r for r in tool_results)


def test_demo_data_trajectory_format(tmp_path, collect_config):
    f = tmp_path / "t.jsonl"
    stats = generate(f, sessions=10, seed=0, fmt="trajectory")
    cfg = collect_config(f)
    m = run(cfg, Workspace(cfg.workspace))
    assert m.extra["formats"] == {"trajectory": 1}
    assert m.counts["invocations"] == stats["calls"]


def test_demo_data_does_not_depend_on_the_current_date(tmp_path, monkeypatch):
    import datetime as dt
    import hashlib

    import faker.providers.date_time as fdt

    a = tmp_path / "a.jsonl"
    generate(a, sessions=20, seed=3)

    class Later(dt.date):
        @classmethod
        def today(cls):
            return dt.date(2031, 1, 1)

    monkeypatch.setattr(fdt, "dtdate", Later)  # Faker's relative dates ("-30d") read this clock
    b = tmp_path / "b.jsonl"
    generate(b, sessions=20, seed=3)
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
