"""evaluate on the demo workspace with a tiny model built in the test: outputs, resume, partial results, errors."""

import json
import shutil

import pyarrow.parquet as pq
import pytest

from slmconvert.errors import StageError
from slmconvert.workspace import Workspace
from tests.conftest import stage_config
from tests.evaluate.conftest import SETS, copy_ws

def test_evaluate_writes_results_summary_and_report_that_agree(tuned_ws, tmp_path):
    from slmconvert.evaluate.stage import run

    # greedy tool names: with the action head (tests/serve/test_backend.py) most grammars narrow to one tool, so a
    # change of the argument rules below would change fewer of them than this test counts
    ws, cfg = copy_ws(tuned_ws, tmp_path, "evaluate.tool_choice=greedy")
    m = run(cfg, Workspace(ws))
    assert m.status == "ran" and m.counts["adapters"] == 3
    rows = pq.read_table(ws / "eval" / "results.parquet").to_pylist()
    # every test example of every site, once per variant (base, fine-tuned)
    assert len(rows) == 2 * m.counts["test_examples"] and {r["variant"] for r in rows} == {"base", "finetuned"}
    assigned = {r["invocation_id"]: r for r in pq.read_table(ws / "clusters" / "assignments.parquet").to_pylist()}
    assert all(assigned[r["invocation_id"]]["split"] == "test" for r in rows)  # the test split only
    for r in rows:
        assert r["kind"] in ("tool", "text") and r["seconds"] >= 0 and r["new_tokens"] <= 8
        assert (r["function_name"] is None) == (r["kind"] == "text")
        assert r["kind"] == "tool" or r["embedding_similarity"] is not None
    summary = json.loads((ws / "eval" / "summary.json").read_text())
    tasks_json = json.loads((ws / "clusters" / "tasks.json").read_text())
    n_tasks = sum(len(s["tasks"]) for s in tasks_json["sites"].values())
    assert len(summary["tasks"]) == n_tasks
    assert all(t["verdict"] in ("replace", "hybrid", "keep-llm") and t["reason"] for t in summary["tasks"])
    h = summary["headline"]
    assert 0.0 <= h["share_calls"] <= 1.0 and sum(h["verdicts"].values()) == n_tasks
    assert summary["cost"]["prices_as_of"]  # the demo log names gpt-4o: calls are priced from configs/prices.yaml
    assert h["llm_cost_total_usd"] and h["llm_cost_total_usd"] > 0
    page = (ws / "eval" / "report.html").read_text()
    from slmconvert.evaluate.report import pct

    assert f"<b id='share-calls'>{pct(h['share_calls'])}</b>" in page
    # the what-if over targets: the one applied is the headline, the others were fitted and verified the same way
    at = summary["policy"]["at_targets"]
    assert [r["target"] for r in at] == sorted({*cfg.evaluate.compare_targets, cfg.evaluate.target_agreement})
    [applied] = [r for r in at if r["applied"]]
    assert applied["share_calls"] == h["share_calls"] and applied["answered"] == h["answered"] and applied["calls"] == h["calls"]
    assert "id='at-targets'" in page and page.count("(applied)") == 1
    # the evidence ceiling: what an SLM agreeing on every call could show with this sample, never below what moved
    ceiling = h["evidence_ceiling"]
    assert ceiling["agreeing_needed_per_kind"] == applied["agreeing_needed_per_kind"]
    assert h["share_calls"] <= ceiling["share_calls"] <= ceiling["share_calls_all_test"] <= 1.0
    assert applied["ceiling_share_calls"] == ceiling["share_calls"] and "id='evidence'" in page
    assert f"<b id='share-tokens'>{pct(h['share_tokens'])}</b>" in page
    assert "id='tasks'" in page and page.count("data:image/png;base64,") >= 2
    assert page.count("<tr class='v-") == n_tasks
    # the grammar serve decodes under: constrained, argument caps read from each site's training calls
    policy = json.loads((ws / "eval" / "policy.json").read_text())
    assert policy["constrained_decoding"] is True and policy["argument_bounds"]
    bounds = [(k, n) for site in policy["argument_bounds"].values() for tool in site.values() for k, n in tool.items()]
    assert all(isinstance(n, int) and n >= 0 for _, n in bounds)  # counts, caps, shapes
    caps = [n for k, n in bounds if k.endswith(("#chars", "#items"))]
    assert caps and all(n > 0 for n in caps)
    assert all(n > 0 for k, n in bounds if k == "#calls")  # each tool's training calls, whose repeats decide #norepeat
    # unchanged: skipped; forced: re-scored from the generation cache, nothing generated again
    assert run(cfg, Workspace(ws)).status == "skipped"
    again = run(cfg, Workspace(ws), force=True)
    assert again.counts["generated_new"] == 0 and again.counts["generated_cached"] == len(rows)
    # a change of the decoding rules generates again only the answers whose grammar it changed: each cached answer
    # is keyed by the tools and schemas its grammar was compiled from, not by the rules' settings
    from slmconvert.constrained import bounded_specs
    from slmconvert.store import load_invocations

    looser = stage_config(ws, f"finetune.models={json.dumps(cfg.finetune.models)}", *SETS, "evaluate.no_repeat_share=null",
                          "evaluate.tool_choice=greedy")
    m = run(looser, Workspace(ws))
    after = json.loads((ws / "eval" / "policy.json").read_text())["argument_bounds"]
    invs = {i.id: i for i in load_invocations(Workspace(ws))}
    changed = sum(bounded_specs(invs[r["invocation_id"]].request.tools, policy["argument_bounds"][r["site"]],
                                invs[r["invocation_id"]].request.messages)
                  != bounded_specs(invs[r["invocation_id"]].request.tools, after[r["site"]], invs[r["invocation_id"]].request.messages)
                  for r in rows)
    assert 0 < changed < len(rows)  # the demo holds answers of both kinds
    assert m.status != "skipped" and (m.counts["generated_new"], m.counts["generated_cached"]) == (changed, len(rows) - changed)


def test_interrupted_evaluation_resumes_from_cached_generations(tuned_ws, tmp_path):
    from slmconvert.evaluate.stage import run
    from tests.conftest import StopAfter

    ws, cfg = copy_ws(tuned_ws, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, Workspace(ws), progress=StopAfter(10, during="evaluating on the test split"))
    assert Workspace(ws).read_manifest("evaluate") is None  # nothing claims to be done
    done_before = sum(1 for _ in open(ws / "eval" / "generations.jsonl"))
    assert done_before >= 4
    m = run(cfg, Workspace(ws))
    assert m.counts["generated_cached"] == done_before
    assert m.counts["generated_new"] + m.counts["generated_cached"] == m.counts["rows"]


def test_missing_adapter_gives_partial_results_and_says_which(tuned_ws, tmp_path):
    from slmconvert.evaluate.stage import run

    ws, cfg = copy_ws(tuned_ws, tmp_path)
    fm = Workspace(ws).read_manifest("finetune")
    gone = fm.extra["adapters"][0]
    shutil.rmtree(ws / gone["path"])
    m = run(cfg, Workspace(ws))
    assert m.counts["adapters"] == 2
    summary = json.loads((ws / "eval" / "summary.json").read_text())
    assert any(gone["path"] in p and "re-run `slmconvert finetune`" in p for p in summary["problems"])
    lost = [t for t in summary["tasks"] if t["site"] == gone["site"]]
    assert lost and all(t["verdict"] == "keep-llm" and "no evaluated adapter" in t["reason"] for t in lost)
    assert (ws / "eval" / "report.html").exists()


def test_evaluate_before_finetune_is_a_clear_error(clustered_demo, tmp_path):
    from slmconvert.evaluate.stage import run

    ws = tmp_path / "ws"
    shutil.copytree(clustered_demo[0], ws)
    with pytest.raises(StageError, match="run `slmconvert finetune --workspace"):
        run(stage_config(ws), Workspace(ws))
    with pytest.raises(StageError, match="needs the output of 'cluster'"):
        run(stage_config(tmp_path / "empty"), Workspace(tmp_path / "empty"))


@pytest.fixture
def judge_server():
    """A judge on loopback: grades 5 when the candidate contains the word 'cancel', else 1."""
    from tests.conftest import FakeLLM

    judge = FakeLLM(reply=lambda body: "5" if "cancel" in body["messages"][-1]["content"].split("Candidate reply:")[-1].lower() else "1")
    yield judge.url, judge.seen
    judge.close()


def test_llm_as_judge_grades_text_replies_through_an_openai_compatible_endpoint(tuned_ws, tmp_path, judge_server, monkeypatch):
    from slmconvert.evaluate.stage import run

    url, seen = judge_server
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-judge-secret-123")
    ws, _ = copy_ws(tuned_ws, tmp_path)
    cfg = stage_config(ws, f"finetune.models={json.dumps(tuned_ws[1].finetune.models)}", *SETS,
                       f"evaluate.judge.url={url}", "evaluate.judge.model=judge-1", "evaluate.judge.api_key_env=MY_JUDGE_KEY")
    run(cfg, Workspace(ws))
    rows = pq.read_table(ws / "eval" / "results.parquet").to_pylist()
    judged = [r for r in rows if r["judge"] is not None]
    text_replies = [r for r in rows if r["kind"] == "text" and not r["predicted_call"]]
    assert judged and len(judged) == len(text_replies) == len(seen)
    assert all(s["path"] == "/v1/chat/completions" and s["auth"] == "Bearer sk-judge-secret-123" for s in seen)
    assert all(s["body"]["model"] == "judge-1" for s in seen)
    for r in judged:  # the judge's grade decides, not the embedding similarity
        assert r["judge"] == (1.0 if "cancel" in r["prediction"].lower() else 0.0)
        assert r["acceptable"] == (r["judge"] >= 0.75)
    summary = (ws / "eval" / "summary.json").read_text()
    assert json.loads(summary)["judge"]["judged"] == len(judged)
    assert "sk-judge-secret-123" not in summary and "sk-judge-secret-123" not in (ws / "eval" / "manifest.json").read_text()


def test_an_unreachable_judge_is_reported_not_fatal(tuned_ws, tmp_path):
    from slmconvert.evaluate.stage import run

    ws, _ = copy_ws(tuned_ws, tmp_path)
    cfg = stage_config(ws, f"finetune.models={json.dumps(tuned_ws[1].finetune.models)}", *SETS,
                       "evaluate.judge.url=http://127.0.0.1:9/v1", "evaluate.judge.model=j", "evaluate.judge.timeout_s=2")
    run(cfg, Workspace(ws))
    summary = json.loads((ws / "eval" / "summary.json").read_text())
    assert summary["judge"]["judged"] == 0 and summary["judge"]["failed"] > 0
    assert "ConnectError" in summary["judge"]["first_error"]


def test_switching_lora_to_full_leaves_one_artefact_and_evaluate_scores_it(tuned_ws, tmp_path):
    """After finetune.method lora -> full, the folder holds exactly model/ (no stale adapter/), and
    evaluate scores the full model: generations are not the adapter's, summary.json names the method."""
    from slmconvert.evaluate.stage import load_summary, run as evaluate
    from slmconvert.finetune.stage import run as finetune

    ws, cfg = copy_ws(tuned_ws, tmp_path)
    evaluate(cfg, Workspace(ws))
    lora = {a["site"]: a for a in load_summary(Workspace(ws))["adapters"]}
    assert {a["method"] for a in lora.values()} == {"lora"} and {a["artefact"] for a in lora.values()} == {"adapter"}
    full_cfg = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"method": "full", "learning_rate": 5e-3})})
    finetune(full_cfg, Workspace(ws))
    for a in lora.values():
        d = ws / a["path"]
        assert (d / "model" / "config.json").exists() and not (d / "adapter").exists()
        assert json.loads((d / "complete.json").read_text())["artefact"] == "model"
    evaluate(full_cfg, Workspace(ws))
    summary = load_summary(Workspace(ws))
    assert {a["method"] for a in summary["adapters"]} == {"full"} and {a["artefact"] for a in summary["adapters"]} == {"model"}
    import pandas as pd

    res = pd.read_parquet(ws / "eval" / "results.parquet")
    tuned = res[res.variant == "finetuned"]
    assert len(tuned) > 0
