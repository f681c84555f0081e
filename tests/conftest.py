import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TAU_BENCH = SHARED / "data" / "tau-bench-airline-gpt4o" / "gpt-4o-airline.json"
PII_SYNTH = SHARED / "data" / "pii-presidio-synth" / "synth_dataset_v2.json"

needs_tau = pytest.mark.skipif(not TAU_BENCH.exists(), reason="../shared/data (τ-bench log) is not beside the repo")


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def rr_record(user: str, answer=None, call=None, session="s1", **extra):
    """A request/response record (format 1)."""
    msg = {"role": "assistant", "content": answer}
    if call:
        name, args = call
        msg["tool_calls"] = [{"id": "c1", "type": "function", "function": {"name": name, "arguments": args}}]
    return {
        "session_id": session,
        "request": {"model": "gpt-4o", "messages": [{"role": "system", "content": "You are a helpful agent."},
                                                    {"role": "user", "content": user}]},
        "response": {"model": "gpt-4o", "choices": [{"message": msg, "finish_reason": "stop"}]},
        **extra,
    }


@pytest.fixture
def collect_config(tmp_path):
    """Build a pipeline config for `collect` with scrubbing off (scrub has its own tests)."""
    from slmconvert.config import load_config

    def make(*paths, ws=None, **collect):
        sets = [f"workspace={json.dumps(str(ws or tmp_path / 'ws'))}", "scrub.enabled=false",
                "collect.paths=" + json.dumps([str(p) for p in paths])]
        sets += [f"collect.{k}={json.dumps(v)}" for k, v in collect.items()]
        return load_config(None, sets)

    return make


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tiny_tokenizer(chat_template: str = CHATML, extra_words=()):
    """A word-level tokenizer built in the test: every character class we need, ChatML markers as special tokens."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    words = list(string.ascii_letters + string.digits + string.punctuation) + ["\n", " "] + list(extra_words)
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = chat_template
    return fast
