"""TensorBoard in a real browser: the example's logs, served by `tensorboard`, opened in headless Chromium.

Skips where Chromium or Playwright is missing. ``NETDIAG_SCREENSHOTS=docs/img`` keeps the screenshots (the
README shows them); otherwise they go to the test's temporary directory.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ROOT = Path(__file__).resolve().parents[1]
# Each TensorBoard view: a tag filter (None: the view has none) and a text that only our logs put on it.
VIEWS = {
    "scalars": ("act_saturated_pct", "netdiag/act_saturated_pct/net.2"),
    "histograms": ("netdiag/act/", "netdiag/act/net.2"),
    "images": ("plots", "netdiag/plots/activations"),
    "text": (None, "netdiag/health_report"),
    "custom_scalars": (None, "D1 activation saturated %"),
}

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian: apt install chromium)"),
    pytest.mark.slow,
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensorboard_shows_every_netdiag_view(tmp_path):
    pytest.importorskip("names")
    playwright = pytest.importorskip("playwright.sync_api")
    example = [sys.executable, str(ROOT / "examples" / "makemore_mlp.py"), "--preset", "deep", "--max-steps", "300"]
    subprocess.run([*example, "--every-n-steps", "50", "--root-dir", str(tmp_path)], check=True, capture_output=True)
    shots = Path(os.environ.get("NETDIAG_SCREENSHOTS", tmp_path))
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path / "lightning_logs"), "--host", "127.0.0.1"]
        + ["--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "tensorboard did not start"
                time.sleep(0.5)
        with playwright.sync_playwright() as p:
            flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
            browser = p.chromium.launch(
                executable_path=CHROMIUM, args=[*flags, "--disable-component-update", "--disable-sync"]
            )
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            for view, (tag_filter, text) in VIEWS.items():
                page.goto(f"http://127.0.0.1:{port}/#{view}")
                if tag_filter is not None:  # the views page their cards: show ours first
                    page.get_by_label("Filter tags").locator("visible=true").first.fill(tag_filter)
                # raises if no visible element shows the text within the timeout
                page.get_by_text(text).locator("visible=true").first.wait_for(timeout=30_000)
                page.wait_for_timeout(1000)  # let the charts draw before the screenshot
                page.screenshot(path=str(shots / f"tensorboard_{view}.png"))
            browser.close()
    finally:
        server.terminate()
        server.wait()
    assert all((shots / f"tensorboard_{view}.png").stat().st_size > 10_000 for view in VIEWS)
