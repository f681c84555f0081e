"""Open a workspace's evaluation report in headless Chromium, save a screenshot, and check what it shows.

    python benchmarks/report_screenshot.py workspace/quickstart [--out report.png]

Prints whether the page has the task table, how many plots rendered, and whether the headline
numbers on the page are the ones in eval/summary.json. Needs Chromium (`apt-get install chromium`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    from slmconvert.evaluate.browser import render
    from slmconvert.evaluate.report import pct

    ap = argparse.ArgumentParser()
    ap.add_argument("workspace", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    page = a.workspace / "eval" / "report.html"
    summary = json.loads((a.workspace / "eval" / "summary.json").read_text())
    out = a.out or a.workspace / "eval" / "report.png"
    dom = render(page, out)
    h = summary["headline"]
    checks = {
        "task table": "id=\"tasks\"" in dom and dom.count("<tr class=\"v-") == len(summary["tasks"]),
        "plots": dom.count("data:image/png;base64,"),
        "share of calls matches summary.json": f">{pct(h['share_calls'])}<" in dom,
        "share of tokens matches summary.json": f">{pct(h['share_tokens'])}<" in dom,
        "share of cost matches summary.json": f">{pct(h['share_cost'])}<" in dom,
    }
    for k, v in checks.items():
        print(f"{k}: {v}")
    print(f"screenshot: {out} ({out.stat().st_size:,} bytes)")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
