"""The rendered report.html in headless Chromium: loads without errors, shows every plot, is not blank."""

from __future__ import annotations

import html as html_mod
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg

from rapidun.reporting import render_report
from rapidun.reporting.html import CSP
from test_reporting import make_run

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
NONCE = "rapidun-check"
# Error listener first (capture phase: also catches <img> load errors and CSP violations), result on window load.
HEAD_PROBE = f"""<script nonce="{NONCE}">
window.__errors = [];
window.addEventListener("error", e => window.__errors.push(
  e.target && e.target !== window ? "resource: " + (e.target.tagName || "?") : "error: " + e.message), true);
window.addEventListener("securitypolicyviolation", e => window.__errors.push("csp: " + e.violatedDirective + " "
  + e.blockedURI));
</script>"""
BODY_PROBE = f"""<script nonce="{NONCE}">
window.addEventListener("load", () => {{
  const pre = document.createElement("pre");
  pre.id = "check";
  pre.textContent = JSON.stringify({{
    images: [...document.images].map(i => i.complete && i.naturalWidth > 0),
    sizes: [...document.images].map(i => [i.naturalWidth, i.naturalHeight]),
    errors: window.__errors,
    title: document.title,
  }});
  document.body.appendChild(pre);
}});
</script>"""


def _browser() -> str:
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    pytest.skip("chromium not installed: apt-get install chromium")


def _run(browser: str, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        f"--user-data-dir={tmp / 'profile'}",
        "--virtual-time-budget=5000",
        *args,
    ]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"chromium did not finish within 60 s: {' '.join(cmd)}\n{e.stderr}")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    browser = _browser()
    tmp = tmp_path_factory.mktemp("chromium")
    paths = render_report(make_run(tmp / "run"))
    n_plots = len([k for k in paths if k not in ("md", "html")])
    return browser, tmp, paths["html"], n_plots


def test_report_loads_in_chromium(rendered):
    browser, tmp, report, n_plots = rendered
    page = report.read_text(encoding="utf-8")
    # Keep the report's own CSP (so data: images must pass it) but let the nonce'd probe scripts run.
    policy = f'content="{CSP}"'
    assert page.count(policy) == 1 and "script-src 'none'" in CSP
    probe_csp = CSP.replace("script-src 'none'", f"script-src 'nonce-{NONCE}'")
    page = page.replace(policy, f'content="{probe_csp}"')
    assert page.count("<head>") == 1 and page.count("</body>") == 1
    page = page.replace("<head>", "<head>\n" + HEAD_PROBE).replace("</body>", BODY_PROBE + "\n</body>")
    check = tmp / "check.html"
    check.write_text(page, encoding="utf-8")

    proc = _run(browser, tmp, "--dump-dom", check.as_uri())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Uncaught" not in proc.stderr, proc.stderr[-3000:]
    m = re.search(r'<pre id="check">(.*?)</pre>', proc.stdout, re.DOTALL)
    assert m, f"no check result in the dumped DOM (page did not load?)\nstdout: {proc.stdout[:2000]}\n{proc.stderr}"
    result = json.loads(html_mod.unescape(m.group(1)))
    assert result["errors"] == []
    assert result["title"].startswith("RapidUn report")
    assert len(result["images"]) == n_plots == 7
    assert all(result["images"]), result
    assert all(w > 100 and h > 100 for w, h in result["sizes"]), result["sizes"]


def test_report_screenshot_not_blank(rendered):
    browser, tmp, report, _ = rendered
    shot = tmp / "shot.png"
    proc = _run(browser, tmp, f"--screenshot={shot}", "--window-size=1200,3000", "--hide-scrollbars", report.as_uri())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert shot.is_file() and shot.read_bytes().startswith(b"\x89PNG")
    img = mpimg.imread(shot)
    assert img.shape[0] >= 2000 and img.shape[1] >= 1000
    colours = np.unique((img[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 50, f"screenshot looks blank: {len(colours)} distinct colours"
    # keep a copy for manual inspection
    shutil.copy(shot, report.parent / "screenshot.png")
