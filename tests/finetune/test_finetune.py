"""finetune on tiny models built in the test (seconds on CPU), plus one slow run on the real SmolLM2."""

import json
import shutil

import pytest
import torch

from slmconvert.config import FinetuneConfig
from slmconvert.errors import StageError
from slmconvert.workspace import Workspace
from tests.conftest import StopAfter, stage_config, tiny_llama, tiny_model_folder

ROWS = [{"prompt": f"<|im_start|>user\nQ{c}<|im_end|>\n<|im_start|>assistant\n", "completion": f"A{c}{c}<|im_end|>"}
        for c in "abcdefgh"]


def test_targets_end_at_the_end_of_turn_token():
    from slmconvert.finetune.data import example_for
    from slmconvert.invocation import Invocation, Request, Response, Source
    from slmconvert.compaction import CompactionRecipe

    tok = tiny_llama()[1]
    inv = Invocation(id="i", source=Source("f", "p", "1"), session_id="s", step=0,
                     request=Request(messages=[{"role": "user", "content": "hi"}]), response=Response("hello"))
    ex, why = example_for(inv, CompactionRecipe(), tok, 512, native=False)
    assert why is None and ex["completion"] == "hello<|im_end|>"
    assert ex["prompt"].endswith("<|im_start|>assistant\n")


def test_loss_is_on_the_completion_only_end_of_turn_included():
    from trl import SFTTrainer

    from slmconvert.finetune.trainer import sft_config

    model, tok = tiny_llama()
    args, _ = sft_config(FinetuneConfig(max_steps=1), "/tmp/unused-ckpt", "cpu", 2)
    trainer = SFTTrainer(model=model, args=args, train_dataset=__import__("datasets").Dataset.from_list(ROWS[:2]),
                         processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    n_prompt = len(tok(ROWS[0]["prompt"], add_special_tokens=False)["input_ids"])
    assert all(lab == -100 for lab in labels[:n_prompt])
    assert labels[n_prompt:] == ids[n_prompt:]
    assert tok.decode(ids[n_prompt:]) == ROWS[0]["completion"]  # ...<|im_end|> is trained: the model learns to stop


def test_adapter_learns_and_base_weights_stay(tmp_path):
    from slmconvert.finetune.trainer import train_adapter

    model, tok = tiny_llama(hidden=128)
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    fc = FinetuneConfig(max_steps=150, learning_rate=5e-3, batch_size=8, lora_r=32, lora_alpha=64, lora_dropout=0.0, checkpoint_steps=1000)
    out = train_adapter(model, tok, ROWS, tmp_path, fc, device="cpu", target_modules=None)
    # A random 2-layer model with frozen random embeddings: LoRA alone cannot reach zero, but it must learn.
    assert out["last_loss"] < 0.6 * out["first_loss"], (out["first_loss"], out["last_loss"])
    peft_model = out["model"]
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # initialised at zero, so they moved
    for name, value in peft_model.get_base_model().state_dict().items():
        key = name.replace("base_layer.", "")
        if "lora_" not in name and key in base_before:
            assert torch.equal(value, base_before[key]), name


@pytest.fixture
def tiny_ws(clustered_demo, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(clustered_demo[0], ws)
    folder = tiny_model_folder(tmp_path / "tiny-base")
    return ws, folder


def ft_config(ws, folder, *sets):
    return stage_config(ws, f"finetune.models=[{folder}]", "finetune.max_steps=6", "finetune.batch_size=4",
                        "finetune.max_length=768", "finetune.checkpoint_steps=3", "finetune.max_train_examples=24", *sets)


def test_interrupted_run_resumes_then_finished_work_is_skipped(tiny_ws):
    from slmconvert.finetune.stage import adapter_dir, run

    ws, folder = tiny_ws
    cfg = ft_config(ws, folder)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, Workspace(ws), progress=StopAfter(4))
    first_site = sorted(p.name for p in (ws / "models").iterdir())
    assert Workspace(ws).read_manifest("finetune") is None  # nothing claims to be done
    m = run(cfg, Workspace(ws))
    resumed = [a for a in m.extra["adapters"] if a["resumed_from"]]
    assert len(resumed) == 1 and resumed[0]["resumed_from"] == "checkpoint-3"
    # the resumed adapter's record covers the whole run: losses from step 1, throughput of this process's steps only
    d = ws / resumed[0]["path"]
    steps = [json.loads(line) for line in (d / "training_log.jsonl").read_text().splitlines()]
    stats = json.loads((d / "train_stats.json").read_text())
    assert [e["step"] for e in steps] == list(range(1, 7)) and stats["first_loss"] == steps[0]["loss"]
    resumed_tokens = stats["tokens_seen"] - next(e["tokens_seen"] for e in steps if e["step"] == 3)
    assert 0 < resumed_tokens < stats["tokens_seen"]
    assert abs(stats["tokens_per_s"] - resumed_tokens / stats["seconds"]) <= 0.1 + 0.01 * stats["tokens_per_s"]
    assert all(a["status"] == "ran" for a in m.extra["adapters"]) and m.counts["adapters"] == 3
    for a in m.extra["adapters"]:
        d = ws / a["path"]
        assert (d / "adapter" / "adapter_model.safetensors").exists() and (d / "adapter" / "chat_template.jinja").exists()
        # with compaction's opt-ins (carry_calls, carry_order) off, recorded as version 3 compacted
        recipe = json.loads((d / "recipe.json").read_text())
        assert recipe["version"] == 3 and "carry_calls" not in recipe
        card = (d / "README.md").read_text()
        assert "training examples" in card and "loss: first" in card and "learning_rate" in card
        assert not (d / "checkpoints").exists()
    assert first_site
    again = run(cfg, Workspace(ws))
    assert again.status == "skipped"
    forced = run(cfg, Workspace(ws), force=True)
    assert forced.counts["trained"] == 3
    # a change of data or settings retrains; an unchanged adapter is skipped even when the stage re-runs
    more = run(ft_config(ws, folder, "finetune.lora_r=4"), Workspace(ws))
    assert more.counts["trained"] == 3
    assert adapter_dir(Workspace(ws), "x/y", "m:z").name == "m-z"


def test_merge_exports_a_full_model(tiny_ws):
    from transformers import AutoModelForCausalLM

    from slmconvert.finetune.stage import run

    ws, folder = tiny_ws
    m = run(ft_config(ws, folder, "finetune.merge=true", "finetune.max_steps=2"), Workspace(ws))
    merged = ws / m.extra["adapters"][0]["path"] / "merged"
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_clear_errors(tiny_ws, tmp_path):
    from slmconvert.finetune.stage import run

    ws, folder = tiny_ws
    with pytest.raises(StageError, match="run `slmconvert select` first"):
        run(stage_config(ws), Workspace(ws))
    with pytest.raises(StageError, match="qlora needs a CUDA GPU"):
        run(ft_config(ws, folder, "finetune.method=qlora", "finetune.device=cpu"), Workspace(ws))
    with pytest.raises(StageError, match="needs the output of 'cluster'"):
        run(ft_config(tmp_path / "empty", folder), Workspace(tmp_path / "empty"))


@pytest.mark.slow
def test_real_smollm2_learns_from_real_calls(tiny_ws):
    from slmconvert.finetune.stage import run

    ws, _ = tiny_ws
    m = run(stage_config(ws, "finetune.models=[smollm2-135m-instruct]", "finetune.max_steps=6", "finetune.batch_size=4",
                         "finetune.learning_rate=1e-3", "finetune.max_train_examples=12", "finetune.max_length=768"),
            Workspace(ws))
    for a in m.extra["adapters"]:
        print(a["site"], a["first_loss"], a["last_loss"], a["tokens_per_s"])
        assert a["tool_format"] == "fallback" and a["examples"] > 0
    assert sum(a["last_loss"] < a["first_loss"] for a in m.extra["adapters"]) >= 2


def test_balanced_sampling_lifts_rare_tools_and_keeps_the_tool_text_mix():
    """sqrt balancing: a frequent tool stops crowding out rare ones, within max_upweight, tool/text mix as in traffic."""
    from slmconvert.finetune.stage import balanced_sample

    tasks = ["tool:get_user"] * 600 + ["tool:book"] * 20 + ["tool:refund"] * 4 + ["text:1"] * 376
    invs = list(range(len(tasks)))
    picked, info = balanced_sample(invs, tasks, 300, seed=0)
    by = {t: d["examples"] for t, d in info["tasks"].items()}
    tool = sum(v for t, v in by.items() if t.startswith("tool"))
    assert abs(tool / len(picked) - 624 / 1000) < 0.02  # the tool-call share of traffic is kept
    assert by["tool:book"] / len(picked) > 2 * 20 / 1000  # a rare tool gets more than its traffic share ...
    assert by["tool:book"] / len(picked) <= 4 * 20 / 1000 + 0.005  # ... at most max_upweight times it
    assert by["tool:get_user"] / len(picked) < 600 / 1000  # and the frequent one less
    assert by["tool:refund"] <= 4 * 4  # repeats are capped too
    uniform, u = balanced_sample(invs, tasks, 300, seed=0, balance="none")
    assert len(uniform) == 300 and u["method"] == "uniform" and len(set(uniform)) == 300
    again, _ = balanced_sample(invs, tasks, 300, seed=0)
    assert again == picked  # seeded


def test_the_training_sample_is_recorded_and_reused(tiny_ws, monkeypatch):
    """A stratified sample per site is written to finetune/train_sample.json; a re-run trains on exactly those
    examples (even if the sampler changed), and a changed setting draws afresh."""
    import slmconvert.finetune.stage as ft
    from slmconvert.io import read_json

    ws, folder = tiny_ws
    cfg = ft_config(ws, folder)
    first = ft.site_data(cfg, Workspace(ws))
    record = read_json(Workspace(ws).stage_dir("finetune") / ft.SAMPLE_FILE)
    assert set(record) == set(first) and all(len(r["ids"]) <= 24 for r in record.values())
    assert {s: [i.id for i in d["train"]] for s, d in first.items()} == {s: r["ids"] for s, r in record.items()}
    monkeypatch.setattr(ft, "balanced_sample", lambda invs, *a, **k: (list(reversed(invs))[:5], {"method": "changed"}))
    again = ft.site_data(cfg, Workspace(ws))  # the recorded sample wins over a different sampler
    assert {s: [i.id for i in d["train"]] for s, d in again.items()} == {s: r["ids"] for s, r in record.items()}
    other = ft.site_data(ft_config(ws, folder, "finetune.max_train_examples=10"), Workspace(ws))
    assert all(d["balance"] == {"method": "changed"} for d in other.values())  # new settings: drawn again


def _session_call():
    """A third call of one session: the LLM's two earlier answers (a tool call, a text reply) are in its history."""
    from slmconvert.invocation import Invocation, Request, Response, Source, ToolCall

    msgs = [{"role": "system", "content": "You help."},
            {"role": "user", "content": "find order 7"},
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_order", "arguments": '{"id": "7"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": '{"status": "sent"}'},
            {"role": "assistant", "content": "It was sent."},
            {"role": "user", "content": "cancel it"}]
    tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object", "properties": {"id": {"type": "string"}}}}}
             for n in ("get_order", "cancel_order")]
    return Invocation(id="i3", source=Source("f", "p", "1"), session_id="s", step=2, request=Request(messages=msgs, tools=tools),
                      response=Response(None, tool_calls=[ToolCall("cancel_order", {"id": "7"}, "c2")]))


def test_history_loss_trains_every_answer_the_window_shows_exactly_as_it_was_answered():
    from trl import SFTTrainer

    from slmconvert.chat import render_completion
    from slmconvert.compaction import CompactionRecipe
    from slmconvert.finetune.data import end_at_eos, example_for
    from slmconvert.finetune.trainer import sft_config
    from slmconvert.invocation import Response, ToolCall

    model, tok = tiny_llama()
    inv = _session_call()
    plain, _ = example_for(inv, CompactionRecipe(), tok, 2048, native=False)
    ex, why = example_for(inv, CompactionRecipe(), tok, 2048, native=False, history_loss=True)
    assert why is None and "input_ids" not in plain
    assert (ex["prompt"], ex["completion"]) == (plain["prompt"], plain["completion"])  # the same example, more of it taught
    assert ex["history_turns"] == 2
    msgs = inv.request.messages
    earlier = [end_at_eos(render_completion(tok, msgs[:2], inv.request.tools, Response(None, tool_calls=[ToolCall("get_order", {"id": "7"}, "c1")])), tok),
               end_at_eos(render_completion(tok, msgs[:4], inv.request.tools, Response("It was sent.")), tok)]
    assert "get_order" in earlier[0] and earlier[1] == "It was sent.<|im_end|>"
    args, _ = sft_config(FinetuneConfig(max_steps=1), "/tmp/unused-ckpt", "cpu", 1)
    trainer = SFTTrainer(model=model, args=args, processing_class=tok, train_dataset=__import__("datasets").Dataset.from_list(
        [{"input_ids": ex["input_ids"], "completion_mask": ex["completion_mask"]}]))
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert tok.decode(ids) == ex["prompt"] + ex["completion"]
    taught, run = [], []
    for i, lab in zip(ids, labels):  # the labelled runs of tokens, in order
        if lab != -100:
            run.append(i)
        elif run:
            taught.append(tok.decode(run))
            run = []
    taught.append(tok.decode(run))
    assert taught == [*earlier, ex["completion"]]  # every answer through its end-of-turn token; no user text, no tool result
    assert ex["history_tokens"] == sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in earlier)


def test_history_loss_skips_an_answer_whose_question_the_window_dropped():
    from slmconvert.chat import fit_messages
    from slmconvert.compaction import CompactionRecipe
    from slmconvert.finetune.data import earlier_turns, example_for

    tok = tiny_llama()[1]
    inv = _session_call()
    full, _ = example_for(inv, CompactionRecipe(), tok, 2048, native=False, history_loss=True)
    # A budget that keeps the tool result but not the first question (nor the tool call answering it)
    tight = full["prompt_tokens"] + full["completion_tokens"] - 20
    ex, why = example_for(inv, CompactionRecipe(), tok, tight, native=False, history_loss=True)
    assert why is None and "find order" not in ex["prompt"]
    assert ex["history_turns"] == 0 and "It was sent." in ex["prompt"]  # shown, but nothing it answers is: not taught
    msgs, tools, prompt, _ = fit_messages(inv.request.messages, inv.request.tools, tok, 2048, False)
    assert len(earlier_turns(tok, msgs, tools, False, prompt)) == 2
