"""clusters/report.html: one self-contained page (the map is an embedded PNG, no external assets)."""

from __future__ import annotations

import base64
import html
import io
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from slmconvert.io import write_text_atomic

MAX_COLOURED = 20


def render_map(coords: np.ndarray, labels: Sequence[str]) -> bytes:
    """A 2-D PCA map of the invocations, coloured by task (the 20 largest; the rest grey)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = [lab for lab, _ in Counter(labels).most_common(MAX_COLOURED)]
    cmap = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(9, 6.5), dpi=110)
    labels_arr = np.asarray(labels)
    rest = ~np.isin(labels_arr, top)
    if rest.any():
        ax.scatter(coords[rest, 0], coords[rest, 1], s=6, c="#cccccc", label=f"other ({int(rest.sum())})")
    for i, lab in enumerate(top):
        m = labels_arr == lab
        ax.scatter(coords[m, 0], coords[m, 1], s=8, color=cmap(i % 20), label=f"{lab} ({int(m.sum())})")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title("Invocations (prompting turn + action), coloured by task")
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:1rem 0;font-size:.9rem}th,td{border:1px solid #ddd;padding:.3rem .5rem;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
pre{white-space:pre-wrap;margin:0;font-size:.8rem;max-width:520px}code{font-size:.85rem}.muted{color:#777}
"""


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def write_report(path: Path, doc: dict[str, Any], png: bytes) -> None:
    e = html.escape
    totals = doc["totals"]
    split = doc["split"]
    acc = doc["router"]["test_accuracy"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>slmconvert cluster report</title><style>{_CSS}</style></head><body>",
             "<h1>Call sites and tasks</h1>",
             f"<p>{totals['calls']:,} invocations in {len(doc['sites'])} call site(s), "
             f"{sum(len(s['tasks']) for s in doc['sites'].values())} task(s). Embeddings: <code>{e(doc['embedding_model'])}</code>. "
             f"Split by session: {split['train_invocations']:,} train / {split['test_invocations']:,} test invocations "
             f"({split['train_sessions']} / {split['test_sessions']} sessions, seed {split['seed']}). "
             f"Router test accuracy: {'n/a' if acc is None else f'{acc:.3f}'}."
             + (" <span class='muted'>Token counts are estimated (~4 characters per token): the log has no usage figures.</span>"
                if totals.get("tokens_estimated") else "") + "</p>",
             f"<img alt='map of invocations coloured by task' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"]
    parts.append("<h2>Call sites</h2><table><tr><th>site</th><th>calls</th><th>share</th><th>tasks</th><th>templates</th><th>tools</th><th>instruction template (head)</th></tr>")
    for s in doc["sites"].values():
        parts.append(f"<tr><td>{e(s['site'])}</td><td class=n>{s['size']:,}</td><td class=n>{_pct(s['share_calls'])}</td>"
                     f"<td class=n>{len(s['tasks'])}</td><td class=n>{s['templates']}</td><td>{e(', '.join(s['tools'])) or '<span class=muted>none</span>'}</td>"
                     f"<td><pre>{e(s['template_head'])}</pre></td></tr>")
    parts.append("</table><h2>Tasks</h2><table id='tasks'><tr><th>site</th><th>task</th><th>label</th><th>calls</th><th>share of calls</th>"
                 "<th>share of prompt tokens</th><th>share of completion tokens</th><th>share of cost</th><th>train / test</th></tr>")
    for s in doc["sites"].values():
        for t in s["tasks"]:
            parts.append(f"<tr><td>{e(t['site'])}</td><td><code>{e(t['task'])}</code></td><td>{e(t['label'])}</td><td class=n>{t['size']:,}</td>"
                         f"<td class=n>{_pct(t['share_calls'])}</td><td class=n>{_pct(t['share_prompt_tokens'])}</td>"
                         f"<td class=n>{_pct(t['share_completion_tokens'])}</td><td class=n>{_pct(t['share_cost']) or '—'}</td>"
                         f"<td class=n>{t['train']} / {t['test']}</td></tr>")
    parts.append("</table><h2>Representative examples</h2>")
    for s in doc["sites"].values():
        for t in s["tasks"]:
            parts.append(f"<h3>{e(t['site'])} · <code>{e(t['task'])}</code> — {e(t['label'])}</h3><table><tr><th>prompting turn</th><th>agent action</th></tr>")
            for ex in t["examples"]:
                parts.append(f"<tr><td><pre>{e(ex['prompt_turn'])}</pre></td><td><pre>{e(ex['action'])}</pre></td></tr>")
            parts.append("</table>")
    parts.append("<p class=muted>Texts shown are from the scrubbed workspace when scrubbing was on.</p></body></html>")
    write_text_atomic(path, "\n".join(parts))
