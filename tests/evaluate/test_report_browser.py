"""The evaluation report as a user sees it: opened in headless Chromium, screenshot taken."""

import json

import pytest

from slmconvert.evaluate.browser import find_browser
from slmconvert.workspace import Workspace
from tests.evaluate.conftest import copy_ws

pytestmark = pytest.mark.skipif(find_browser() is None, reason="Chromium is not installed (apt-get install chromium)")


def test_report_renders_in_chromium_with_table_plots_and_the_summary_numbers(tuned_ws, tmp_path):
    from PIL import Image

    from slmconvert.evaluate.browser import render
    from slmconvert.evaluate.report import pct
    from slmconvert.evaluate.stage import run

    ws, cfg = copy_ws(tuned_ws, tmp_path)
    run(cfg, Workspace(ws))
    summary = json.loads((ws / "eval" / "summary.json").read_text())
    png = tmp_path / "report.png"
    dom = render(ws / "eval" / "report.html", png, width=1300, height=3200)
    h = summary["headline"]
    assert 'id="tasks"' in dom and dom.count('<tr class="v-') == len(summary["tasks"])
    assert f">{pct(h['share_calls'])}<" in dom and f">{pct(h['share_tokens'])}<" in dom
    # the policy serve applies, with its evidence: one row per rule, the verification table, the confusion table
    rules = sum(len(r) for r in summary["policy"]["rules"].values())
    assert rules and dom.count('<tr class="r-') == rules and 'id="verification"' in dom and 'id="confusion"' in dom
    assert f"{h['calls']} sampled calls of" in dom  # which sessions the headline was measured on
    assert 'id="plot-accuracy"' in dom and 'id="plot-moved"' in dom
    img = Image.open(png).convert("RGB")
    assert img.size == (1300, 3200)
    # the plots were drawn: the fine-tuned bars' blue and the headline boxes are on screen, not a blank page
    colours = {c for _, c in img.getcolors(maxcolors=1 << 20)}
    assert (0x2a, 0x7a, 0xb9) in colours
    assert len(colours) > 50
