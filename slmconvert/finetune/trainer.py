"""The one place that builds trl / peft objects (an upstream rename touches this file only).

`train_adapter` fine-tunes one model on prompt/completion examples with SFTTrainer: LoRA (peft)
on a bf16/fp32 base, QLoRA on a 4-bit base (bitsandbytes, CUDA), or full fine-tuning. It saves
resumable checkpoints and resumes from the last one.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from pathlib import Path
from typing import Any

from slmconvert.progress import NULL_PROGRESS, Progress

CHECKPOINTS = "checkpoints"


def pick_device(requested: str | None) -> str:
    import torch

    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def bf16_ok(device: str) -> bool:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def lora_config(fc, target_modules: list[str] | None):
    from peft import LoraConfig

    return LoraConfig(r=fc.lora_r, lora_alpha=fc.lora_alpha, lora_dropout=fc.lora_dropout, bias="none",
                      task_type="CAUSAL_LM", target_modules=target_modules or "all-linear")


def sft_config(fc, output_dir: Path, device: str, n_examples: int):
    from trl import SFTConfig

    packing = fc.packing and _flash_attention_available(device)
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir), num_train_epochs=fc.epochs, max_steps=fc.max_steps,
        per_device_train_batch_size=min(fc.batch_size, max(n_examples, 1)), gradient_accumulation_steps=fc.grad_accum,
        learning_rate=fc.learning_rate, lr_scheduler_type="cosine", warmup_steps=0.03,
        logging_steps=1, save_strategy="steps", save_steps=fc.checkpoint_steps, save_total_limit=2,
        max_length=fc.max_length, completion_only_loss=True, report_to="none", seed=fc.seed, data_seed=fc.seed,
        bf16=bf16_ok(device), use_cpu=not device.startswith("cuda"),
        include_num_input_tokens_seen="non_padding", disable_tqdm=True, dataloader_num_workers=0,
        packing=packing, packing_strategy="bfd",
    )
    if not packing:
        kwargs["train_sampling_strategy"] = "group_by_length"  # batches of similar length: little padding
    # Activation checkpointing trades ~30% speed for a lot of memory (the option was renamed in
    # transformers 5; set whichever this version has).
    names = {f.name for f in dataclasses.fields(SFTConfig)}
    key = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    kwargs[key] = fc.activation_checkpointing
    return SFTConfig(**kwargs), packing


def _flash_attention_available(device: str) -> bool:
    if not device.startswith("cuda"):
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def last_checkpoint(output_dir: Path) -> str | None:
    """The newest *complete* checkpoint. The Trainer writes trainer_state.json last; a process killed
    while saving leaves a folder without it (or with it torn), which is removed, not resumed from."""
    import shutil

    if not output_dir.exists():
        return None
    found = []
    for d in output_dir.glob("checkpoint-*"):
        step = d.name.rsplit("-", 1)[-1]
        if d.is_dir() and step.isdigit():
            found.append((int(step), d))
    for _, d in sorted(found, reverse=True):
        try:
            json.loads((d / "trainer_state.json").read_text(encoding="utf-8"))
            return str(d)
        except (OSError, ValueError):
            shutil.rmtree(d, ignore_errors=True)
    return None


def progress_callback(progress: Progress, log: list[dict[str, Any]]):
    from transformers import TrainerCallback

    class _Report(TrainerCallback):
        def __init__(self) -> None:
            self.t0 = time.perf_counter()
            self.tokens0 = None

        def on_train_begin(self, args, state, control, **kw):
            progress.start("fine-tuning", total=state.max_steps)
            progress.advance(state.global_step)

        def on_step_end(self, args, state, control, **kw):
            progress.advance(1)

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or "loss" not in logs:
                return
            tokens = state.num_input_tokens_seen or 0
            if self.tokens0 is None:
                self.tokens0 = tokens
            dt = time.perf_counter() - self.t0
            entry = {"step": state.global_step, "epoch": round(state.epoch or 0, 3), "loss": round(float(logs["loss"]), 4),
                     "learning_rate": logs.get("learning_rate"), "tokens_seen": tokens,
                     "tokens_per_s": round((tokens - self.tokens0) / dt, 1) if dt > 0 else None}
            log.append(entry)
            describe = getattr(progress, "describe", None)
            if describe:
                describe(f"fine-tuning · loss {entry['loss']:.3f} · {entry['tokens_per_s'] or 0:.0f} tok/s")

        def on_train_end(self, args, state, control, **kw):
            progress.stop()

    return _Report()


def _tokens_seen(checkpoint: str | None) -> int:
    """Input tokens the run had seen when `checkpoint` was saved (0: a fresh run)."""
    if checkpoint is None:
        return 0
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return int(state.get("num_input_tokens_seen") or 0)


def _earlier_log(history: list[dict[str, Any]], first_step: int) -> list[dict[str, Any]]:
    """The loss entries logged before this process took over (a resumed run: restored from the checkpoint's
    trainer_state.json), in the training log's shape; their throughput was measured by the process that logged them."""
    return [{"step": e["step"], "epoch": round(e.get("epoch") or 0, 3), "loss": round(float(e["loss"]), 4),
             "learning_rate": e.get("learning_rate"), "tokens_seen": e.get("num_input_tokens_seen"), "tokens_per_s": None}
            for e in history if "loss" in e and "step" in e and e["step"] < first_step]


def train_adapter(model, tokenizer, rows: list[dict[str, Any]], output_dir: Path, fc, *, device: str,
                  target_modules: list[str] | None, progress: Progress = NULL_PROGRESS) -> dict[str, Any]:
    """Train on `rows` (prompt/completion); checkpoints in output_dir/checkpoints. Returns the trained model and stats."""
    from datasets import Dataset, disable_progress_bars
    from trl import SFTTrainer

    disable_progress_bars()

    ckpt_dir = output_dir / CHECKPOINTS
    args, packed = sft_config(fc, ckpt_dir, device, len(rows))
    peft_config = None if fc.method == "full" else lora_config(fc, target_modules)
    if fc.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    log: list[dict[str, Any]] = []
    if rows and "input_ids" in rows[0]:  # tokenized here (finetune.history_loss): trl builds labels from the mask
        dataset = Dataset.from_list([{"input_ids": r["input_ids"], "completion_mask": r["completion_mask"]} for r in rows])
    else:
        dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    with warnings.catch_warnings():  # transformers 5 renamed gradient -> activation checkpointing; peft still asks the old name
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config,
                             callbacks=[progress_callback(progress, log)])
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for cb in (PrinterCallback, ProgressCallback):  # our own progress display is the only one
        trainer.remove_callback(cb)
    resume = last_checkpoint(ckpt_dir)
    tokens_before = _tokens_seen(resume)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - t
    log[:0] = _earlier_log(trainer.state.log_history, log[0]["step"] if log else trainer.state.global_step + 1)
    losses = [e["loss"] for e in log]
    tokens = trainer.state.num_input_tokens_seen or 0
    tokens_here = tokens - tokens_before  # throughput is this process's: a resumed run counts from its checkpoint
    return {
        "trainer": trainer,
        "model": trainer.model,
        "resumed_from": Path(resume).name if resume else None,
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0, 3),
        "train_loss": round(float(result.training_loss), 4),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "seconds": round(seconds, 2),
        "tokens_seen": int(tokens),
        "tokens_per_s": round(tokens_here / seconds, 1) if seconds > 0 else None,
        "examples_per_s": round(result.metrics.get("train_samples_per_second", 0.0), 3),
        "packing": packed,
        "bf16": bool(args.bf16),
        "log": log,
    }


def save_outputs(trained: dict[str, Any], tokenizer, out_dir: Path, merge: bool) -> list[str]:
    """Adapter (or full model) and tokenizer/chat template into out_dir; optionally a merged model."""
    model = trained["model"]
    files = []
    target = out_dir / ("adapter" if hasattr(model, "peft_config") else "model")
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    files.append(target.name)
    if merge and hasattr(model, "merge_and_unload"):
        merged = model.merge_and_unload()
        merged.save_pretrained(out_dir / "merged")
        tokenizer.save_pretrained(out_dir / "merged")
        files.append("merged")
    (out_dir / "training_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in trained["log"]))
    files.append("training_log.jsonl")
    return files
