import json
import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Converted models go to a per-run cache, never to the user's ~/.cache.
os.environ.setdefault("SLMCONVERT_CACHE", tempfile.mkdtemp(prefix="slmconvert-test-cache-"))

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


# ----------------------------------------------------------------------------- shared workspaces

def stage_config(ws, *sets):
    """A pipeline config on workspace `ws`, scrubbing off (scrub has its own tests)."""
    from slmconvert.config import load_config

    return load_config(None, [f"workspace={json.dumps(str(ws))}", "scrub.enabled=false", *sets])


def collect_into(ws, *paths):
    from slmconvert.collect.stage import run
    from slmconvert.workspace import Workspace

    run(stage_config(ws, "collect.paths=" + json.dumps([str(p) for p in paths])), Workspace(ws))


@pytest.fixture(scope="session")
def clustered_demo(tmp_path_factory):
    """The demo sample (60 sessions, 3 call sites), collected and clustered: (ws, cluster manifest, root)."""
    from slmconvert.cluster.stage import run
    from slmconvert.demo import generate
    from slmconvert.workspace import Workspace

    root = tmp_path_factory.mktemp("demo")
    generate(root / "logs.jsonl", sessions=60, seed=3)
    ws = root / "ws"
    collect_into(ws, root / "logs.jsonl")
    return ws, run(stage_config(ws), Workspace(ws)), root


@pytest.fixture(scope="session")
def clustered_mixed(tmp_path_factory):
    """τ-bench + demo-data in one workspace (different agents, no agent names given), clustered."""
    from slmconvert.cluster.stage import run
    from slmconvert.demo import generate
    from slmconvert.workspace import Workspace

    if not TAU_BENCH.exists():
        pytest.skip("../shared/data (τ-bench log) is not beside the repo")
    root = tmp_path_factory.mktemp("mixed")
    generate(root / "demo.jsonl", sessions=80, seed=5)
    collect_into(root / "ws", TAU_BENCH, root / "demo.jsonl")
    return root / "ws", run(stage_config(root / "ws"), Workspace(root / "ws"))


@pytest.fixture(scope="session")
def clustered_tau(tmp_path_factory, clustered_mixed):
    """The τ-bench log alone, clustered (its embeddings come from the mixed run's cache)."""
    import shutil

    from slmconvert.cluster.stage import run
    from slmconvert.workspace import Workspace

    ws = tmp_path_factory.mktemp("tau") / "ws"
    collect_into(ws, TAU_BENCH)
    shutil.copytree(clustered_mixed[0] / "clusters" / "cache", ws / "clusters" / "cache")
    return ws, run(stage_config(ws), Workspace(ws))


def tiny_llama(seed: int = 0, hidden: int = 32, layers: int = 2):
    """A 2-layer random Llama over the character tokenizer: (model, tokenizer), built in seconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg), tok


def tiny_model_folder(path, **kw):
    """Save a tiny Llama + tokenizer where a catalogue `sources.folder` can point."""
    model, tok = tiny_llama(**kw)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_catalogue(path, folder, name="tiny-llama", **fields):
    import yaml

    entry = {"name": name, "family": "test", "params_b": 0.0001, "licence": "apache-2.0", "context_length": 8192,
             "tool_calling": False, "sources": {"folder": str(folder)}, **fields}
    path.write_text(yaml.safe_dump({"kind": "model-catalogue", "models": [entry]}))
    return path


class StopAfter:
    """A progress reporter that simulates Ctrl-C after n steps (for interrupted-run tests)."""

    def __init__(self, n, during: str | None = None):
        self.n, self.seen, self.during, self.label = n, 0, during, ""

    def start(self, label, total=None):
        self.label = label

    def stop(self):
        pass

    def describe(self, label):
        pass

    def advance(self, k=1):
        if self.during is not None and self.during not in self.label:
            return  # only steps of the named part count (e.g. generation, not the embeddings before it)
        self.seen += k
        if self.seen > self.n:
            raise KeyboardInterrupt


class FakeLLM:
    """An OpenAI-compatible /chat/completions on loopback: `reply(body) -> str` answers, every request is recorded."""

    def __init__(self, reply=lambda body: "The LLM answered.", delay: float = 0.0, raw=None):
        """`raw(body) -> (status, JSON value)` replaces the whole answer (refusals, errors, odd JSON)."""
        import threading
        import time
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.seen = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                if delay:
                    time.sleep(delay)
                status, value = raw(body) if raw else (200, {
                    "id": "chatcmpl-up", "object": "chat.completion", "created": 1, "model": body.get("model", "gpt-4o"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": reply(body)}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16}})
                kind = "application/json"
                if body.get("stream") and status == 200 and not raw:  # server-sent events, as OpenAI streams
                    text, kind = reply(body), "text/event-stream"
                    head = {"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1, "model": body.get("model", "gpt-4o")}
                    pieces = [{"role": "assistant", "content": ""}] + [{"content": text[i:i + 5]} for i in range(0, len(text), 5)]
                    events = [{**head, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in pieces]
                    events.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
                    if (body.get("stream_options") or {}).get("include_usage"):
                        events.append({**head, "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16}})
                    out = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
                else:
                    out = json.dumps(value).encode()
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
