"""Pipeline configuration: one typed section per stage, validated at load.

Order of precedence: defaults < YAML file < `--set key=value`. Unknown keys and bad values
are all reported at once, each with its key path. Renamed keys keep working for a while
through `RENAMED_KEYS` and print a warning.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slmconvert.errors import ConfigError
from slmconvert.io import sha256_obj
from slmconvert.sources import DEFAULT_EMBEDDING_MODEL


class StrictModel(BaseModel):
    """Unknown keys are errors; `renamed_keys` maps an old key to its new name with a warning."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    renamed_keys: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _apply_renames(cls, data: Any) -> Any:
        if isinstance(data, dict) and cls.renamed_keys:
            data = dict(data)
            for old, new in cls.renamed_keys.items():
                if old in data:
                    warnings.warn(f"config key {old!r} is renamed {new!r}; please update your pipeline file", stacklevel=2)
                    data.setdefault(new, data.pop(old))
        return data


class DemoDataConfig(StrictModel):
    """Generate the synthetic sample log before `collect` (used by the quickstart)."""

    output: str = Field("demo-data/agent_logs.jsonl", description="Where the generated log is written.")
    sessions: int = Field(120, ge=2, description="Number of conversations to generate.")
    seed: int = Field(0, description="Random seed: the same seed gives the same file.")
    format: Literal["request-response", "trajectory", "shapes"] = Field(
        "request-response", description="request-response: one gateway record per call; trajectory: one conversation per "
        "record; shapes: one object per agent with its policy stored once, conversations nested under output.history, a user's "
        "own tool calls, an agent acting in plain text and per-user client ids.")


class CollectConfig(StrictModel):
    paths: list[str] = Field(default_factory=list, description="Log files or folders to ingest.")
    format: str | None = Field(None, description="Log format name; auto-detected per file when unset.")
    tools_file: str | None = Field(None, description="JSON file of OpenAI tool schemas; overrides inferred tools.")
    strict: bool = Field(False, description="Fail (exit non-zero) when any record is quarantined.")
    agent: str | None = Field(None, description="Agent name recorded on every invocation that has none.")
    model: str | None = Field(None, description="LLM name recorded on every invocation whose log does not say.")
    recursive: bool = Field(True, description="Descend into sub-folders of a folder path.")
    messages_path: str | None = Field(None, description="Dotted path to the message list(s) in each record, `*` for every list element (e.g. output.history, calls.*.messages). Default: found wherever they are nested.")
    partition_mb: float = Field(16.0, gt=0, description="Megabytes of log per session partition: calls are grouped by session into ceil(MB read / partition_mb) partitions, each deduplicated, scrubbed and written on its own (memory holds one; Ray scrubs them in parallel, so a log of N x partition_mb keeps N workers busy). Changing it re-collects.")
    text_actions: list[str | dict[str, Any]] = Field(
        default_factory=lambda: ["http", "call"],
        description="Plain-text actions read as tool calls. Built-ins ('http': METHOD url [json]; 'call': NAME(json)) apply to "
                    "conversations without structured tool calls; declared rules {name, pattern (regex with named groups), tool "
                    "(name or {group}), arguments: json|query|text|http, render} always apply. [] turns it off.")


class ScrubConfig(StrictModel):
    enabled: bool = Field(True, description="Scrub PII/PHI/secrets before anything is written. Switch off only knowingly.")
    policy: str = Field("default", description="A policy name in configs/scrub/ or a path to a policy YAML file.")
    surrogates: Literal["fake", "placeholder"] = Field("fake", description="Realistic fakes, or typed placeholders like <PERSON_1>.")
    seed: int = Field(0, description="Seed of the surrogate generator.")
    batch_size: int = Field(64, ge=1, description="Texts per spaCy batch.")
    n_process: int = Field(2, ge=1, description="spaCy worker processes for NER (used for large batches only).")


class ClusterConfig(StrictModel):
    """Call sites from request features, tasks from the agent's actions, a router, the train/test split."""

    embedding_model: str = Field(DEFAULT_EMBEDDING_MODEL, description="sentence-transformers model: hub id, folder, or pypi:PACKAGE/PATH.")
    batch_size: int = Field(64, ge=1, description="Texts per embedding batch.")
    device: str | None = Field(None, description="torch device for embeddings (default: cpu).")
    max_seq_length: int = Field(128, ge=16, description="Word pieces the embedding model reads per text (longer texts are truncated; cost grows with it).")
    site_threshold: float = Field(0.35, gt=0, lt=1, description="Templates closer than this (mean of text cosine distance and tool-set Jaccard distance) are one call site.")
    text_method: Literal["kmeans", "hdbscan"] = Field("kmeans", description="How text replies are clustered into tasks: KMeans with k by silhouette, or HDBSCAN after PCA.")
    max_text_tasks: int = Field(12, ge=2, description="Upper bound on the number of text-reply tasks per call site.")
    min_task_size: int = Field(5, ge=2, description="Smallest task worth its own cluster; smaller argument shapes join their tool's main task.")
    min_silhouette: float = Field(0.05, ge=-1, le=1, description="Below this silhouette the text replies of a site stay one task.")
    silhouette_tolerance: float = Field(0.05, ge=0, le=1, description="Take the largest k whose silhouette is within this share of the best k's.")
    test_fraction: float = Field(0.2, ge=0, lt=1, description="Share of sessions held out for evaluation (0: no test split).")
    seed: int = Field(0, description="Seed of the split and of the clustering.")
    examples: int = Field(3, ge=0, le=20, description="Representative examples kept per task.")


DEFAULT_LICENCES = ["apache-2.0", "mit", "llama3.1", "llama3.2", "gemma", "qwen-research",
                    "nvidia-open-model-license", "nvidia-community-model-license"]


class CompactionConfig(StrictModel):
    """How prompts are compacted for the SLM (the same in select, finetune, evaluate and serve)."""

    enabled: bool = Field(True, description="Drop a static system prompt, window the history, truncate long tool results.")
    max_history_tokens: int = Field(1536, ge=64, description="Token budget of the prompt after compaction (estimated).")
    max_tool_result_chars: int = Field(2000, ge=100, description="Longer tool results are cut, with a marker.")
    carry_values: int = Field(24, ge=0, description="At most this many values (ids, dates, amounts) kept from messages the history window drops, for the keys whose values the LLM copies into its tool calls on the site's training calls; 0: none.")
    carry_calls: int = Field(0, ge=0, description="At most this many of the tool calls the history window drops (the most recent) named in the same line, with their arguments: what the agent already did. 0 (the default): none; on τ-bench with SmolLM2-135M at 640 history tokens, 12 (with carry_order copied) lowered function-name accuracy from 0.469 to 0.388 on the same 98 test calls (README).")
    carry_order: Literal["recent", "copied"] = Field("recent", description="Which carried values come first when there are more than carry_values: the most recent, or those of the keys the LLM copies most often (on τ-bench more of the copied values are then in the prompt, 81.8% -> 85.0% at 640 tokens, but measured only together with carry_calls, see there).")


class SelectConfig(StrictModel):
    """Candidate SLMs per call site: catalogue filters, then a quick probe of the models available here."""

    catalogue: str | None = Field(None, description="Catalogue YAML (default: configs/models.yaml).")
    models: list[str] | None = Field(None, description="Only consider these catalogue names (default: all).")
    memory_budget_gb: float = Field(16.0, gt=0, description="Memory available for training one model (GB).")
    precision: Literal["bf16", "int4"] = Field("bf16", description="Weights precision the memory check assumes (int4 = QLoRA).")
    training_overhead: float = Field(3.0, ge=1, description="Training memory as a multiple of the weights (LoRA: activations, adapter, optimizer).")
    licences: list[str] = Field(default_factory=lambda: list(DEFAULT_LICENCES), description="Licence allow-list (catalogue licence ids).")
    require_native_tools: bool = Field(False, description="Exclude models whose chat template has no native tool calling.")
    local_models: dict[str, str] = Field(default_factory=dict, description="Catalogue name -> local folder with its weights.")
    download: bool = Field(False, description="Also consider hub models that are not on this machine yet: one quick check of the hub, the size shown, then downloaded into the Hugging Face cache when probed. Off: only folders, package files and the local Hugging Face cache.")
    probe: bool = Field(True, description="Probe the available models zero-shot and few-shot on a sample of each site's tasks.")
    probe_max_examples: int = Field(8, ge=1, description="Probe examples per call site, drawn round-robin over its tasks from the train split.")
    probe_shots: int = Field(2, ge=0, description="Examples shown in the few-shot probe.")
    probe_max_models: int = Field(3, ge=1, description="Models probed per call site at most (smallest first).")
    max_new_tokens: int = Field(128, ge=1, description="Generation budget per probe answer.")
    max_prompt_tokens: int = Field(2048, ge=256, description="Probe prompts are fitted into this many tokens (and into what finetune.max_length leaves), the way evaluate fits them: history windowed, then over-long messages cut.")
    probe_time_budget_s: float = Field(120.0, gt=0, description="Seconds the whole probe may take (model loading included), shared evenly by the (model, site) pairs still to probe; examples beyond a pair's share are not probed, and the report says how many.")
    batch_size: int = Field(4, ge=1, description="Probe generation batch size.")
    top_k: int = Field(2, ge=1, description="Candidates kept per call site for finetune.")
    seed: int = Field(0)


class FinetuneConfig(StrictModel):
    """LoRA/QLoRA distillation of the LLM's logged responses into each call site's candidate SLMs."""

    models: list[str] | None = Field(None, description="Models to train (catalogue names or references); default: select's candidates.")
    candidates_per_site: int = Field(1, ge=1, description="How many of select's ranked candidates to train per site.")
    method: Literal["lora", "qlora", "full"] = Field("lora", description="qlora loads the base in 4-bit (bitsandbytes; CUDA).")
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, description="LoRA targets (default: the catalogue's, else all linear layers).")
    epochs: float = Field(2.0, gt=0)
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: epochs decide).")
    learning_rate: float = Field(2e-4, gt=0)
    batch_size: int = Field(8, ge=1, description="Examples per device step.")
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(2048, ge=64, description="Tokens per example (prompt + answer); older turns are dropped to fit.")
    max_train_examples: int | None = Field(None, ge=1, description="Cap on training examples per site (seeded sample, see `balance`).")
    balance: Literal["sqrt", "none"] = Field("sqrt", description="How a site's training examples are drawn over its tasks: sqrt gives each task a share in proportion to the square root of its size (rare tools up-weighted, at most `max_upweight` times their traffic share; the tool-call vs text-reply mix kept as in traffic); none samples uniformly.")
    history_loss: bool = Field(True, description="Also train on the LLM's earlier answers that each example's history window shows (the loss on every assistant turn of the prompt whose question it shows, not only the answer): more supervised answers per forward pass at the same cost. On τ-bench (SmolLM2-135M, 300 examples x 1 epoch, the same 200 test calls): text replies answered as text 0.30 -> 0.43 (14 calls gained, none lost), function name unchanged (0.573, 4 gained, 4 lost). false: the loss on the answer only.")
    max_upweight: float = Field(4.0, ge=1.0, description="A rare task gets at most this many times its traffic share of the training examples (repeats allowed when it has too few).")
    packing: bool = Field(True, description="Padding-free packing where the attention kernel supports it (flash-attn on CUDA); length-grouped batches otherwise.")
    activation_checkpointing: bool = Field(True, description="Recompute activations in the backward pass: ~30% slower, far less memory (on CPU, sdpa keeps every attention matrix otherwise: 4 x 2k-token examples of SmolLM2-135M exceed 24 GB).")
    checkpoint_steps: int = Field(50, ge=1, description="Save a resumable checkpoint every N steps.")
    device: str | None = Field(None, description="cuda / cpu (default: cuda when available).")
    merge: bool = Field(False, description="Also export the base model with the adapter merged in.")
    seed: int = Field(0)


class JudgeConfig(StrictModel):
    """An OpenAI-compatible endpoint that grades text replies against the LLM's (LLM-as-judge)."""

    url: str = Field(..., min_length=1, description="Base URL, e.g. https://api.openai.com/v1 or http://localhost:8000/v1.")
    model: str = Field(..., min_length=1, description="The judge model name the endpoint serves.")
    api_key_env: str | None = Field("SLMCONVERT_JUDGE_API_KEY", description="Environment variable holding the API key (never stored).")
    pass_at: float = Field(0.75, ge=0, le=1, description="A text reply is acceptable when the judge's score (grade 1-5 mapped to 0-1) reaches this.")
    max_examples: int = Field(200, ge=1, description="Judge at most this many text replies per model and site.")
    timeout_s: float = Field(60.0, gt=0)


class EvaluateConfig(StrictModel):
    """Compare the base and fine-tuned SLMs with the LLM's logged responses on the test split; fit and verify the routing policy serve applies."""

    base: bool = Field(True, description="Also evaluate each base model untrained (with the full instructions), for comparison.")
    max_test_examples: int | None = Field(200, ge=1, description="Test calls per call site at most: a seeded sample in proportion to its tasks' test calls, every task with at least `min_per_task`; results are re-weighted to the traffic mix. null: all.")
    min_per_task: int = Field(3, ge=0, description="Rare tasks still get this many sampled test calls (when they have them), so the per-task table shows them.")
    max_new_tokens: int = Field(256, ge=1, description="Generation budget per answer.")
    max_prompt_tokens: int = Field(4096, ge=128, description="Older turns are dropped until a prompt fits (as in training).")
    batch_size: int = Field(8, ge=1, description="Generation batch size.")
    device: str | None = Field(None, description="cuda / cpu (default: cuda when available).")
    text_similarity_at: float = Field(0.8, ge=0, le=1, description="A text reply is acceptable when its embedding cosine similarity to the LLM's reaches this (no judge).")
    replace_at: float = Field(0.9, gt=0, le=1, description="Verdict `replace` when at least this share of a task's test answers is acceptable.")
    hybrid_min_coverage: float = Field(0.3, gt=0, le=1, description="Verdict `hybrid` needs a confidence threshold under which the SLM still answers this share of calls at `replace_at` quality.")
    min_test_examples: int = Field(5, ge=1, description="Fewer test examples than this: `keep-llm` (not enough evidence).")
    target_agreement: float = Field(0.95, gt=0, lt=1, description="The routing policy lets the SLM answer a kind of answer only where the one-sided lower confidence bound of its agreement with the LLM, on calibration sessions, reaches this.")
    confidence_level: float = Field(0.95, gt=0.5, lt=1, description="Confidence level of that bound and of the intervals reported on verification sessions.")
    confidence_signal: str = Field("auto", description="How an answer's confidence is read (slmconvert.policy.confidence_signals: mean_logprob, min_logprob, first_token, tool_name, argument_values); auto: the one with the best AUROC (agreeing vs not) on calibration sessions. The policy's thresholds are on this signal.")
    constrained_decoding: bool = Field(True, description="Tool calls follow the request's tool schemas (xgrammar): only an offered tool, with schema-valid arguments, or a text reply. serve decodes as evaluate did.")
    tool_choice: Literal["greedy", "whole_name", "head"] = Field("head", description="With constrained decoding, which tool a call names: head, the tool the site's action head picks (slmconvert.action_head: a classifier fitted on the train split's tool calls over the turn that prompts the call and the agent's last two actions; the grammar then lets the SLM call only that tool or reply in text, so whether to call a tool and the arguments stay the SLM's; where a site has too few tool calls for a head, greedy); greedy, the name the SLM reaches one token at a time; whole_name, the offered tool whose whole opening the SLM finds most probable (one extra pass). serve decodes as evaluate did. On τ-bench (README) the head names the LLM's tool in about 3 of 4 held-out calls where SmolLM2-135M's greedy choice names it in about half; whole_name was no better than greedy.")
    copy_arguments: float | None = Field(0.95, gt=0, le=1, description="With constrained decoding: a string argument the LLM copied from the request (one of its word-like tokens) in at least this share of a site's training calls (10 values at least) can only be such a token of the request in hand, of the shape the LLM's copies had (ids, dates, codes are copied, not re-generated). null: off.")
    no_repeat_share: float | None = Field(0.02, ge=0, lt=1, description="With constrained decoding: a tool of one argument that the site's LLM called again with the very argument of a call already in the conversation in at most this share of its training calls (10 calls at least) cannot be called again with a value the conversation already called it with (its argument's enum loses those values; a lookup whose answer the conversation holds is not repeated). null: off.")
    gate_encoder: Literal["auto", "int8", "float"] = Field("auto", description="What embeds requests for the request gate, here (where its thresholds are fitted) and in serve (which embeds as evaluate did, recorded with the gate): int8, the embedding model exported to ONNX Runtime with int8 weights (about half the CPU per request of float in serve: benchmarks/gate_encoder.py; onnxruntime and onnx, installed with slmconvert); float, the model as it is (torch, or ONNX Runtime's equal vectors); auto: int8 when it can be built, else float.")
    compare_targets: list[float] = Field([0.8, 0.9, 0.95, 0.99], description="Also fit the routing policy at these target agreements (on the same calibration sessions) and verify each on the verification sessions: what would move, and how well it would agree, at another target. A what-if for choosing `target_agreement`; serve applies only the policy at `target_agreement`.")
    @field_validator("compare_targets")
    @classmethod
    def _targets_in_range(cls, v: list[float]) -> list[float]:
        bad = [t for t in v if not 0 < t < 1]
        if bad:
            raise ValueError(f"target agreements are shares between 0 and 1 (exclusive), got {bad}")
        return sorted(set(v))

    novelty_alpha: float = Field(0.02, gt=0, lt=1, description="Request gate: a request less similar to the site's training requests than all but this share of calibration requests goes to the LLM (a conformal bound on how many familiar requests it turns away).")
    @field_validator("confidence_signal")
    @classmethod
    def _known_signal(cls, v: str) -> str:
        from slmconvert.policy import confidence_signals

        if v != "auto" and v not in confidence_signals:
            raise ValueError(f"unknown confidence signal {v!r} (known: auto, {', '.join(confidence_signals.names())})")
        return v

    judge: JudgeConfig | None = Field(None, description="Optional LLM-as-judge for text replies.")
    prices: str | None = Field(None, description="LLM price table (default: configs/prices.yaml).")
    llm_model: str | None = Field(None, description="Price calls as this LLM when the log does not name the model.")
    slm_hour_usd: float = Field(1.0, ge=0, description="What an hour of the SLM's hardware costs (GPU or CPU instance), for the SLM side of the cost.")
    examples_in_report: int = Field(12, ge=0, description="Disagreements shown side by side in the report.")
    seed: int = Field(0)


class ServeConfig(StrictModel):
    """`slmconvert serve`: the OpenAI-compatible endpoint (SLM first where evaluation allows, LLM otherwise)."""

    mode: Literal["convert", "proxy"] = Field("convert", description="convert: SLM first, LLM fallback; proxy: pass-through logging proxy.")
    upstream: str | None = Field(None, description="Base URL of the upstream LLM API (OpenAI-compatible), e.g. https://api.openai.com/v1.")
    upstream_key_env: str | None = Field("SLMCONVERT_UPSTREAM_API_KEY", description="Environment variable with the upstream API key (never logged).")
    host: str = Field("127.0.0.1", description="Bind address (loopback by default).")
    port: int = Field(8000, ge=0, le=65535)
    api_keys_env: str = Field("SLMCONVERT_API_KEYS", description="Environment variable with the accepted client keys, comma-separated.")
    api_key_file: str | None = Field(None, description="File with accepted client keys, one per line.")
    no_auth: bool = Field(False, description="Accept requests without a client key (explicit opt-out).")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Larger requests get HTTP 413.")
    max_concurrency: int = Field(64, ge=1, description="Requests in flight at once; more wait up to queue_timeout_s, then get 429.")
    queue_timeout_s: float = Field(30.0, gt=0)
    upstream_timeout_s: float = Field(120.0, gt=0, description="An upstream slower than this gives HTTP 504.")
    max_new_tokens: int | None = Field(None, ge=1, description="SLM answer budget; null: evaluate.max_new_tokens, the budget the routing policy was verified with.")
    device: str | None = Field(None, description="cuda / cpu for the SLMs (default: cuda when available).")
    log_calls: bool = Field(True, description="Append every call (scrubbed per scrub.*) to WS/serve/calls-DATE.jsonl.")
    batch_size: int = Field(8, ge=1, description="In-process SLM: concurrent requests of one adapter generated together, at most.")
    batch_wait_ms: float = Field(5.0, ge=0, description="In-process SLM: how long the first request of a batch waits for others.")
    slm_backend: str | None = Field(None, description="Base URL of an OpenAI-compatible server running the exported SLMs "
                                    "(vLLM, llama-server, Ollama; `slmconvert export`); null: the SLMs run in this process.")
    slm_backend_sites: str | None = Field(None, description="The export's sites.json (site -> model name, llama.cpp adapter id); "
                                          "null: each site is asked for as slm-<site>.")
    slm_backend_timeout_s: float = Field(60.0, gt=0, description="An SLM backend slower than this: the request goes to the LLM.")
    slm_backend_grammar: Literal["auto", "structural_tag", "gbnf", "none"] = Field("auto", description="How the slm_backend is told the tool-call grammar the policy was verified with: structural_tag sends xgrammar's structural tag as `structured_outputs` (vLLM >= 0.12); gbnf sends llama-server a lazy GBNF `grammar` triggered by `<tool_call>`; none sends nothing (the engine decodes freely: invalid calls still go to the LLM, but agreement may fall below what was verified); auto: what the export's sites.json says per site (vllm: structural_tag, llamacpp: gbnf, ollama: none), else none.")
    gate_runtime: Literal["auto", "onnx", "torch"] = Field("auto", description="What embeds requests for the request gate: onnx exports the embedding model to ONNX Runtime at start (the same vectors, checked on probe texts; about half torch's time per request on real requests, several times less on very short ones; onnxruntime and onnx, installed with slmconvert); torch: sentence-transformers as in cluster and evaluate; auto: onnx when it is installed and its vectors match, else torch. A gate evaluate fitted with int8 vectors (evaluate.gate_encoder) is served with the same int8 model, checked against evaluate's vectors at start; where it cannot be, auto uses float vectors and says so, onnx is an error.")
    gate_overlap: bool = Field(True, description="With slm_backend: the engine starts generating while the request gate embeds the request, so the gate adds no latency when generation takes longer than the embedding (~15 ms on CPU); a request the gate then refuses has cost the engine one generation. false: the gate first, then the engine.")


class RayConfig(StrictModel):
    """Where and how wide `engine: ray` runs (collect's parsing and scrubbing, cluster's embedding)."""

    address: str | None = Field(None, description="An existing Ray cluster (`auto`, `ray://host:10001`, host:port); unset: a local Ray on this machine.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray (default: all of this machine's).")
    workers: int | None = Field(None, ge=1, description="Scrub and embedding workers (each loads spaCy and Presidio, or the embedding model, once); default: the cluster's CPUs.")
    chunk_mb: float = Field(16.0, gt=0, description="Megabytes of a JSONL log per parsing task (other files are one task each).")
    embed_chunk: int = Field(1024, ge=1, description="Texts per embedding task (each worker encodes whole chunks in length order, as one process does).")


class PipelineConfig(StrictModel):
    workspace: str = Field("workspace", description="The workspace folder every stage reads and writes.")
    engine: Literal["local", "ray"] = Field("local", description="local: this process. ray: collect (parse, scrub) and embedding run as Ray Data pipelines, locally or on the cluster at ray.address; the workspace written is the same.")
    ray: RayConfig = Field(default_factory=RayConfig)
    demo_data: DemoDataConfig | None = None
    collect: CollectConfig = Field(default_factory=CollectConfig)
    scrub: ScrubConfig = Field(default_factory=ScrubConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    compaction: CompactionConfig = Field(default_factory=CompactionConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @field_validator("workspace")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be a non-empty path")
        return v

    def section_hash(self, section: str) -> str:
        return sha256_obj(getattr(self, section).model_dump(mode="json"))


# --------------------------------------------------------------------------- loading


def format_error(err: dict[str, Any]) -> str:
    path = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{path}: unknown key"
    msg = err["msg"]
    if "input" in err and err["type"] not in {"missing"}:
        shown = repr(err["input"])
        if len(shown) > 80:
            shown = shown[:77] + "..."
        return f"{path}: {msg}, got {shown}"
    return f"{path}: {msg}"


def _suggest_unknown(problems: list[str], data: dict) -> list[str]:
    """Add the valid keys to 'unknown key' problems so a typo is easy to fix."""
    out = []
    for p in problems:
        if p.endswith(": unknown key"):
            path = p[: -len(": unknown key")].split(".")
            model: Any = PipelineConfig
            for part in path[:-1]:
                fld = getattr(model, "model_fields", {}).get(part)
                ann = fld.annotation if fld else None
                model = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
                if model is None:
                    break
            if model is not None:
                p += f" (valid: {', '.join(model.model_fields)})"
        out.append(p)
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError("--set", [f"{item!r}: expected KEY=VALUE, e.g. collect.strict=true"])
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError("--set", [f"{item!r}: empty key path"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    problems = []
    for item in overrides:
        try:
            path, value = parse_override(item)
        except ConfigError as e:
            problems.extend(e.problems)
            continue
        node = data
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                problems.append(f"{'.'.join(path)}: {part!r} is not a section")
                break
            node = nxt
        else:
            node[path[-1]] = value
    if problems:
        raise ConfigError("--set", problems)
    return data


def load_yaml(path: Path) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), ["file not found"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError(str(path), [f"not UTF-8 text (byte {e.start})"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(str(path), [f"{where}invalid YAML ({getattr(e, 'problem', e)})"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), [f"the top level must be a mapping of sections, got {type(data).__name__}"])
    return data


def build_config(data: dict, source: str = "config") -> PipelineConfig:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            return PipelineConfig.model_validate(data)
    except ValidationError as e:
        problems = [format_error(err) for err in e.errors()]
        raise ConfigError(source, _suggest_unknown(problems, data)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a pipeline file (or the defaults when None), apply `--set` overrides, validate.

    Relative paths in the file (workspace, collect.paths, tools_file, demo_data.output) are
    resolved against the current directory, like every other CLI argument.
    """
    data = load_yaml(Path(path)) if path else {}
    data = apply_overrides(data, list(overrides or []))
    return build_config(data, str(path) if path else "config")
