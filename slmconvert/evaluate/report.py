"""eval/report.html: one self-contained page (plots are embedded PNGs), built from summary.json.

Every number on the page is read from the summary dict that is also written to summary.json,
so the two cannot disagree.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from slmconvert.io import write_text_atomic

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem;color:#222;max-width:1250px}
table{border-collapse:collapse;margin:1rem 0;font-size:.85rem}th,td{border:1px solid #ddd;padding:.3rem .5rem;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
pre{white-space:pre-wrap;margin:0;font-size:.78rem;max-width:380px;max-height:16rem;overflow:auto}.muted{color:#777}
.v-replace,.r-slm{background:#e3f6e3}.applied{font-weight:bold}.v-hybrid{background:#fff6d6}.v-keep-llm,.r-llm{background:#fbe7e7}
.headline{display:flex;gap:2rem;margin:1rem 0}.headline div{border:1px solid #ddd;border-radius:6px;padding:.6rem 1rem}
.headline b{font-size:1.6rem;display:block}img{max-width:100%}
"""


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def num(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _quality(agg: dict[str, Any] | None) -> float | None:
    return None if not agg else agg.get("acceptable")


def plots(summary: dict[str, Any]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out = {}
    tasks = [t for t in summary["tasks"] if t.get("finetuned") or t.get("base")]
    if tasks:
        labels = [f"{t['task']}" if len(summary["chosen_adapters"]) < 2 else f"{t['site']}/{t['task']}" for t in tasks]
        base = [(_quality(t.get("base")) or 0.0) for t in tasks]
        tuned = [(_quality(t.get("finetuned")) or 0.0) for t in tasks]
        y = np.arange(len(tasks))
        fig, ax = plt.subplots(figsize=(9, 0.32 * len(tasks) + 1.4), dpi=100)
        ax.barh(y - 0.2, base, 0.4, label="base SLM", color="#bbbbbb")
        ax.barh(y + 0.2, tuned, 0.4, label="fine-tuned SLM", color="#2a7ab9")
        ax.axvline(summary["thresholds"]["replace_at"], color="#c33", ls="--", lw=1, label="replace threshold")
        ax.set_yticks(y, [lab[:48] for lab in labels], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("acceptable answers on the test split (vs the LLM's logged response)")
        ax.legend(fontsize=7, loc="lower right")
        out["accuracy"] = _png(fig)
    h = summary["headline"]
    fig, ax = plt.subplots(figsize=(5, 2.6), dpi=100)
    names = ["calls", "tokens", "cost"]
    vals = [h["share_calls"], h["share_tokens"] or 0.0, h["share_cost"] or 0.0]
    ivs = [h.get("share_calls_interval"), h.get("share_tokens_interval"), h.get("share_cost_interval")]
    err = np.array([[max(0.0, v - iv[0]) if iv else 0.0 for v, iv in zip(vals, ivs)],
                    [max(0.0, iv[1] - v) if iv else 0.0 for v, iv in zip(vals, ivs)]])
    ax.bar(names, vals, color=["#2a7ab9", "#4b9a5b", "#d08a2a"], yerr=err, capsize=4)
    ax.axhspan(0.4, 0.7, color="#999", alpha=0.15, label="paper's estimate (40-70%)")
    for i, v in enumerate(vals):
        ax.text(i, v + 0.02, pct(v) if names[i] != "cost" or h["share_cost"] is not None else "n/a", ha="center", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share moved to SLMs")
    ax.legend(fontsize=7, loc="upper right")
    out["moved"] = _png(fig)
    curves = (summary.get("policy") or {}).get("risk_coverage") or {}
    if any(curves.values()):
        fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=100)
        ver = summary["policy"]["verification"]
        for site, pts in sorted(curves.items()):
            if not pts:
                continue
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.4, label=f"{site}"[:30])
            op = ver.get(site) or {}
            if op.get("answered"):
                ax.plot([op["coverage"]], [op["agreement"]], "o", color=line.get_color(), ms=7, mec="black")
        ax.axhline(summary["policy"]["target_agreement"], color="#c33", ls="--", lw=1, label="target agreement")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("coverage (share of verification calls the SLM answers)")
        ax.set_ylabel("agreement with the LLM")
        ax.legend(fontsize=7, loc="lower left")
        out["risk_coverage"] = _png(fig)
    speed = summary["speed"]
    bars = [(f"SLM {s}"[:28], v["seconds_per_call"] or 0.0) for s, v in speed["slm"].items()]
    if speed.get("llm_seconds_per_call") is not None:
        bars.append(("LLM (logged)", speed["llm_seconds_per_call"]))
    if bars:
        fig, ax = plt.subplots(figsize=(5, 0.4 * len(bars) + 1.2), dpi=100)
        ax.barh([b[0] for b in bars], [b[1] for b in bars], color="#6b5fb5")
        ax.set_xlabel("seconds per call")
        ax.invert_yaxis()
        out["latency"] = _png(fig)
    return out


def _iv(iv) -> str:
    return f"[{pct(iv[0])}–{pct(iv[1])}]" if iv else ""


def policy_sections(summary: dict[str, Any]) -> list[str]:
    """The routing policy's rules with their evidence, the request gate, and the confusion table."""
    e = html.escape
    pol = summary.get("policy") or {}
    if not pol:
        return []
    ver = pol["verification"]
    out = ["<h2>Routing policy</h2><table id='rules'><tr><th>site</th><th>SLM's answer</th><th>action</th><th>min confidence</th>"
           "<th>calibration evidence</th><th>why</th></tr>"]
    for site, rules in sorted(pol.get("rules", {}).items()):
        for key, r in sorted(rules.items()):
            c = r.get("calibration", {})
            out.append(f"<tr class='r-{e(r['action'])}'><td>{e(site)}</td><td>{e(key)}</td>"
                       f"<td><b>{e(r['action'])}</b></td><td class='n'>{num(r.get('min_confidence'))}</td>"
                       f"<td class='n'>{c.get('agree', 0)}/{c.get('answered', 0)} agree, {c.get('invalid', 0)} invalid</td>"
                       f"<td>{e(r['reason'])}</td></tr>")
    out.append("</table>")
    out.append("<table id='verification'><tr><th>site</th><th>verification calls</th><th>SLM answers</th><th>coverage</th>"
               "<th>agreement</th><th>share of traffic</th><th>request gate (min similarity)</th></tr>")
    for site, v in [(k, v) for k, v in ver.items() if k != "all"] + [("all", ver["all"])]:
        gate = (pol.get("requests") or {}).get(site) or {}
        out.append(f"<tr><td>{e(site)}</td><td class='n'>{v['calls']}</td><td class='n'>{v['answered']}</td>"
                   f"<td class='n'>{pct(v['coverage'])} {_iv(v['coverage_interval'])}</td>"
                   f"<td class='n'>{pct(v['agreement'])} {_iv(v['agreement_interval']) if v['answered'] else ''}</td>"
                   f"<td class='n'>{pct(v['share_calls'])} {_iv(v['share_calls_interval'])}</td>"
                   f"<td class='n'>{num(gate.get('min_similarity'))}</td></tr>")
    out.append("</table>")
    if pol.get("gate_encoder"):
        out.append(f"<p>The request gate's similarities are embedded by {e(pol['gate_encoder']['what'])}; serve embeds "
                   f"requests with the same encoder ({e(pol['gate_encoder']['id'])}).</p>")
    if pol.get("at_targets"):
        out.append("<p>What another target would move (each policy fitted on the calibration sessions, verified on the same "
                   "verification calls; serve applies only the target marked). Choosing the target by this table uses the "
                   "verification sessions, so the interval of the target picked is somewhat optimistic.</p>"
                   "<table id='at-targets'><tr><th>target agreement</th><th>share of traffic moved</th><th>agreement of what moves</th>"
                   "<th>kinds of answer to the SLM</th><th>agreeing calibration answers a kind needs</th>"
                   "<th>most an SLM agreeing on every call could move (calls evaluated / all test calls)</th></tr>")
        for r in pol["at_targets"]:
            mark = (" class='applied'", " (applied)") if r["applied"] else ("", "")
            out.append(f"<tr{mark[0]}><td class='n'>{pct(r['target'])}{mark[1]}</td>"
                       f"<td class='n'>{pct(r['share_calls'])} {_iv(r['share_calls_interval'])}</td>"
                       f"<td class='n'>{pct(r['agreement']) if r['answered'] else 'n/a'} {_iv(r['agreement_interval']) if r['answered'] else ''}</td>"
                       f"<td class='n'>{r['kinds_to_slm']}</td><td class='n'>{r['agreeing_needed_per_kind']}</td>"
                       f"<td class='n'>{pct(r.get('ceiling_share_calls'))} / {pct(r.get('ceiling_share_calls_all_test'))}</td></tr>")
        out.append("</table>")
    ev = pol.get("evidence") or {}
    if ev.get("kinds"):
        out.append(f"<p id='evidence'>Evidence ceiling at the applied target: a kind of answer goes to the SLM only when at least "
                   f"{ev['agreeing_needed_per_kind']} of its calibration answers agree, so even an SLM that agreed on every call "
                   f"could move at most {pct(ev['share_calls'])} of the traffic with the calls evaluated "
                   f"({pct(ev['share_calls_all_test'])} with every test call evaluated)."
                   + (f" To show more: {e(ev['advice'])}." if ev.get("advice") else "")
                   + " Largest kinds (calibration calls sampled / in the whole test split): "
                   + ", ".join(f"{e(k['key'])} {k['calibration_sampled']} / {k['calibration_in_test_split']}" for k in ev["kinds"])
                   + ".</p>")
    sig = pol.get("confidence_signal") or {}
    if sig.get("auroc_on_calibration"):
        aur = sig["auroc_on_calibration"]
        sites = sorted({k for v in aur.values() for k in v})
        out.append(f"<p id='signal'>Confidence signal thresholded: <b>{e(sig['chosen'])}</b>. How well each signal separates "
                   "agreeing from disagreeing answers on calibration (ROC AUC; 0.5 is chance):</p><table id='auroc'><tr><th>signal</th>"
                   + "".join(f"<th>{e(x)}</th>" for x in sites) + "</tr>"
                   + "".join(f"<tr><td>{e(name)}</td>" + "".join(f"<td class='n'>{num(v.get(x))}</td>" for x in sites) + "</tr>"
                             for name, v in aur.items()) + "</table>")
    head = ((summary.get("action_head") or {}).get("sites")) or {}
    if head:
        out.append("<p id='action-head'>Which tool a call names (<code>evaluate.tool_choice: head</code>): each site's action "
                   "head, fitted on the train split's tool calls, measured on every test tool call of held-out sessions.</p>"
                   "<table id='action-heads'><tr><th>site</th><th>names the LLM's tool</th><th>always the most frequent tool</th>"
                   "<th>test tool calls (sessions)</th><th>fitted on calls (sessions)</th></tr>"
                   + "".join(f"<tr><td>{e(site)}</td><td class='n'>{pct(m.get('accuracy'))}</td>"
                             f"<td class='n'>{pct(m.get('most_frequent_accuracy'))}</td>"
                             f"<td class='n'>{m.get('test_calls', 0)} ({m.get('test_sessions', 0)})</td>"
                             f"<td class='n'>{m['train_calls']} ({m.get('train_sessions', '—')})</td></tr>" if m.get("fitted") else
                             f"<tr><td>{e(site)}</td><td colspan='4'>none: {e(m.get('why', ''))} (greedy names)</td></tr>"
                             for site, m in sorted(head.items())) + "</table>")
    why = ver["all"].get("not_answered_because") or {}
    if why:
        out.append("<p>Sent to the LLM because: " + ", ".join(f"{e(k)} {n}" for k, n in why.items()) + ".</p>")
    conf = pol.get("confusion") or {}
    keys = sorted({k for row in conf.values() for k in row})
    if conf:
        out.append("<h3>LLM's task × SLM's answer (all evaluated test calls)</h3><table id='confusion'><tr><th>LLM's task</th>"
                   + "".join(f"<th>{e(k)}</th>" for k in keys) + "</tr>")
        for task, row in conf.items():
            mine = task.split("/", 1)[1]
            out.append(f"<tr><td>{e(task)}</td>" + "".join(
                f"<td class='n'{' style=font-weight:bold' if k == mine or (k == 'text' and mine.startswith('text')) else ''}>{row.get(k, '') or ''}</td>" for k in keys) + "</tr>")
        out.append("</table>")
    return out


def write_report(path: Path, summary: dict[str, Any], rows: list[dict[str, Any]], n_examples: int) -> None:
    e = html.escape
    h, cost = summary["headline"], summary["cost"]
    imgs = plots(summary)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>slmconvert evaluation</title><style>{_CSS}</style></head><body>",
             "<h1>What moves to the SLM, and does it agree with the LLM?</h1>",
             "<p class='muted'>Test split only (conversations never seen in training). An answer is <i>acceptable</i> when it "
             "could stand in for the LLM's logged one: the same tool call with BFCL-equivalent arguments, or a text reply "
             f"close enough to the LLM's (embedding similarity &ge; {summary['thresholds']['text_similarity_at']}"
             + (f", or judge score &ge; {summary['thresholds']['judge_pass_at']}" if summary['thresholds'].get('judge_pass_at') is not None else "")
             + ").</p>",
             "<div class='headline' id='headline'>",
             f"<div><b id='share-calls'>{pct(h['share_calls'])}</b>of calls move to SLMs {_iv(h.get('share_calls_interval'))}</div>",
             f"<div><b id='agreement'>{pct(h['agreement'])}</b>of those agree with the LLM {_iv(h.get('agreement_interval'))}</div>",
             f"<div><b id='share-tokens'>{pct(h['share_tokens'])}</b>of tokens</div>",
             f"<div><b id='share-cost'>{pct(h['share_cost'])}</b>of LLM cost</div>",
             "</div>",
             f"<p id='measured-on'>What <code>serve</code> does under the routing policy (<code>eval/policy.json</code>), measured on "
             f"{e(h['measured_on'])}; shares re-weighted to the traffic mix, {pct(summary['policy']['confidence_level'])} intervals. "
             f"Target agreement {pct(summary['policy']['target_agreement'])} as a one-sided lower bound on calibration.</p>",
             f"<p>{e(h['paper_estimate'])} is the paper's estimate for real agents. LLM cost moved: "
             f"{'n/a' if cost['llm_cost_moved_usd'] is None else '$' + format(cost['llm_cost_moved_usd'], '.4f')} of "
             f"{'n/a' if cost['llm_cost_total_usd'] is None else '$' + format(cost['llm_cost_total_usd'], '.4f')} in this log "
             f"(prices as of {e(cost['prices_as_of'])}); SLM cost for those calls "
             f"{'n/a' if cost['slm_cost_moved_usd'] is None else '$' + format(cost['slm_cost_moved_usd'], '.4f')} at "
             f"${cost['slm_hour_usd']:g}/hour.</p>"]
    if summary["problems"]:
        parts.append("<h2>Problems</h2><ul>" + "".join(f"<li>{e(p)}</li>" for p in summary["problems"]) + "</ul>")
    parts += policy_sections(summary)
    if imgs.get("accuracy"):
        parts.append(f"<h2>Per-task quality: base vs fine-tuned</h2><img id='plot-accuracy' alt='per-task accuracy' src='data:image/png;base64,{imgs['accuracy']}'>")
    parts.append("<div style='display:flex;gap:2rem;flex-wrap:wrap'>")
    if imgs.get("risk_coverage"):
        parts.append(f"<div><h2>Risk–coverage (verification sessions)</h2><img id='plot-risk-coverage' alt='risk-coverage' "
                     f"src='data:image/png;base64,{imgs['risk_coverage']}'><p class='muted'>Lines: one confidence threshold for "
                     "all valid answers of a site; dots: what the policy's per-answer rules do.</p></div>")
    parts.append(f"<div><h2>Share moved</h2><img id='plot-moved' alt='share moved' src='data:image/png;base64,{imgs['moved']}'></div>")
    if imgs.get("latency"):
        parts.append(f"<div><h2>Latency</h2><img id='plot-latency' alt='latency' src='data:image/png;base64,{imgs['latency']}'>"
                     f"<p class='muted'>{e(summary['speed']['note'])}</p></div>")
    parts.append("</div>")
    parts.append("<h2>Per-task view</h2><p class='muted'>Grouped by the task of the <i>LLM's</i> answer: where the SLM is "
                 "good. A diagnosis, not what serve gates on (that is the policy above).</p><table id='tasks'><tr><th>site</th><th>task</th><th>label</th><th>calls</th><th>test</th>"
                 "<th>base acceptable</th><th>fine-tuned acceptable</th><th>function name</th><th>arguments</th>"
                 "<th>chrF</th><th>similarity</th><th>verdict</th><th>why</th></tr>")
    for t in summary["tasks"]:
        ft = t.get("finetuned") or {}
        parts.append(
            f"<tr class='v-{e(t['verdict'])}'><td>{e(t['site'])}</td><td>{e(t['task'])}</td><td>{e(t['label'])}</td>"
            f"<td class='n'>{t['size']}</td><td class='n'>{t['evaluated']}</td>"
            f"<td class='n'>{pct(_quality(t.get('base')))}</td><td class='n'>{pct(_quality(t.get('finetuned')))}</td>"
            f"<td class='n'>{pct(ft.get('function_name'))}</td><td class='n'>{pct(ft.get('arguments'))}</td>"
            f"<td class='n'>{num(ft.get('chrf'), 2)}</td><td class='n'>{num(ft.get('embedding_similarity'), 2)}</td>"
            f"<td><b>{e(t['verdict'])}</b></td><td>{e(t['reason'])}</td></tr>")
    parts.append("</table>")
    if summary.get("per_argument"):
        parts.append("<h2>Per-argument accuracy (fine-tuned)</h2><table id='arguments'><tr><th>tool</th><th>argument</th><th>accuracy</th></tr>")
        for tool, args in sorted(summary["per_argument"].items()):
            for arg, acc in sorted(args.items()):
                parts.append(f"<tr><td>{e(tool)}</td><td>{e(arg)}</td><td class='n'>{pct(acc)}</td></tr>")
        parts.append("</table>")
    bad = [r for r in rows if r["variant"] == "finetuned" and not r["acceptable"]
           and summary["chosen_adapters"].get(r["site"]) == r["model"]][:n_examples]
    if bad:
        parts.append("<h2>Disagreements (fine-tuned SLM vs LLM)</h2><table id='examples'><tr><th>task</th><th>turn</th>"
                     "<th>LLM (logged)</th><th>SLM</th></tr>")
        for r in bad:
            parts.append(f"<tr><td>{e(r['site'])}/{e(r['task'])}</td><td><pre>{e(r['prompt_turn'])}</pre></td>"
                         f"<td><pre>{e(r['expected'])}</pre></td><td><pre>{e(r['prediction'])}</pre></td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    write_text_atomic(path, "\n".join(parts))
