"""Render a report page in headless Chromium: a screenshot and the DOM as the browser built it."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Flags for a closed network: no background connections, no first-run work, no GPU.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--run-all-compositor-stages-before-draw",
         "--virtual-time-budget=5000"]


def find_browser() -> str | None:
    return next((p for p in (shutil.which(b) for b in BROWSERS) if p), None)


def render(page: Path, png: Path, width: int = 1300, height: int = 2400, timeout: float = 120.0) -> str:
    """Screenshot `page` into `png`; return the DOM after load (what a user's browser shows)."""
    browser = find_browser()
    if browser is None:
        raise FileNotFoundError("no Chromium found (apt-get install chromium); looked for " + ", ".join(BROWSERS))
    url = Path(page).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="slmconvert-chromium-") as profile:
        common = [browser, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"]
        subprocess.run([*common, f"--screenshot={Path(png).resolve()}", url], check=True, capture_output=True, timeout=timeout)
        dom = subprocess.run([*common, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=timeout).stdout
    return dom
