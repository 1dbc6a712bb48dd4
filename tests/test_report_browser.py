"""The rendered report in a real browser: headless Chromium loads it offline, every figure decodes, nothing errs.

A copy of the page gets a small check script (the page itself has none) that records console errors, failed
loads, each <img>'s natural width and the summary rows into the DOM; `--dump-dom` brings them back.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fakes import fabricate_all  # noqa: E402

from repro.experiments import load_registry  # noqa: E402
from repro.report import build_report  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (Debian: apt-get install "
                                                          "chromium; `make test` installs it)")]

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0"]

# Goes first in <head> so that it sees every error, including failed image loads (captured on window).
HOOK = """<script>
window.__errors = [];
window.addEventListener('error', function (e) {
  window.__errors.push(e.message || ('failed to load ' + ((e.target && (e.target.src || e.target.href)) || '?')));
}, true);
var __origError = console.error;
console.error = function () { window.__errors.push(Array.prototype.join.call(arguments, ' ')); };
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var pre = document.createElement('pre');
  pre.id = 'check-result';
  pre.textContent = JSON.stringify({
    errors: window.__errors,
    widths: imgs.map(function (i) { return i.complete ? i.naturalWidth : -1; }),
    srcs: imgs.map(function (i) { return i.getAttribute('src').slice(0, 22); }),
    claims: Array.prototype.map.call(document.querySelectorAll('#summary-table tbody tr'),
                                     function (r) { return r.getAttribute('data-claim'); }),
    resources: performance.getEntriesByType('resource').map(function (e) { return e.name; })
  });
  document.body.appendChild(pre);
});
</script>"""


def chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("browser")
    registry = load_registry()
    fabricate_all(tmp / "runs", registry, scale="smoke", seeds=2)
    return build_report(tmp / "runs", tmp / "report" / "index.html", registry=registry)


def inspect(html: str, tmp_path: Path) -> tuple[dict, str]:
    """Load `html` (plus the check hook) in Chromium; return the check's findings and Chromium's log."""
    check = tmp_path / "check.html"
    check.write_text(html.replace("<head>", "<head>" + HOOK, 1))
    proc = chromium(["--dump-dom", check.as_uri()], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = re.search(r'<pre id="check-result">(.*?)</pre>', proc.stdout, re.S)
    assert m, "the check script did not run: " + proc.stderr[-2000:]
    return json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&")), proc.stderr


def test_the_check_catches_a_broken_figure(tmp_path):
    html = ('<!DOCTYPE html><html><head><title>t</title></head><body>'
            '<img src="data:image/png;base64,iVBORw0KGgoAAAA"><img src="data:image/png;base64,'
            'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==">'
            '</body></html>')
    result, _ = inspect(html, tmp_path)
    assert result["widths"] == [0, 1]  # the truncated PNG does not decode, the 1x1 PNG does
    assert len(result["errors"]) == 1


def test_page_loads_offline_with_every_figure_decoded(page, tmp_path):
    html = page.read_text()
    assert "<script" not in html.lower(), "the report itself must carry no script"
    result, log = inspect(html, tmp_path)

    assert result["errors"] == []
    # the page's own console stays silent (Chromium logs every console message as CONSOLE)
    assert not [line for line in log.splitlines() if ":CONSOLE" in line]
    # one summary row per registered claim, in any order
    assert sorted(result["claims"]) == sorted(load_registry())
    # figures: fabricated runs give at least the deltas chart, learning curves, figures 1, 3 and 4
    assert len(result["widths"]) >= 5
    assert all(w > 0 for w in result["widths"]), result["widths"]
    assert all(s.startswith("data:image/png;base64") for s in result["srcs"])
    # nothing is fetched: no stylesheet, font, script or image from anywhere
    assert result["resources"] == []


def test_page_of_runs_made_by_the_runner(fake_engine, tmp_path, capsys):
    """The runner's own run store at smoke scale (stand-in engine: no training), rendered and loaded in the browser.

    The claims whose analyses need a trained model and real data (ensemble, filters, retrieval) are not run here,
    so they must show as "not run".
    """
    from repro.runner import run_experiments

    skipped = {"ensemble", "first-layer-filters", "retrieval"}
    for name in sorted(set(load_registry()) - skipped):
        run_experiments(name, "smoke", data_dir="data/x", runs_dir=tmp_path / "runs", seeds=2, progress=False)
    page = build_report(tmp_path / "runs", tmp_path / "report" / "index.html")
    result, _ = inspect(page.read_text(), tmp_path)
    assert result["errors"] == [] and result["resources"] == []
    assert sorted(result["claims"]) == sorted(load_registry())
    assert result["widths"] and all(w > 0 for w in result["widths"])
    text = page.read_text()
    rows = re.findall(r'<tr class="claim-row" data-claim="([^"]+)">(.*?)</tr>', text, re.S)
    assert len(rows) == len(load_registry())
    for name, row in rows:
        assert ('class="verdict v-not-run"' in row) == (name in skipped), name


def test_screenshot_renders(page, tmp_path):
    from PIL import Image

    from repro.report.screenshot import screenshot

    shot = screenshot(page, tmp_path / "report.png", width=1200, height=1600)
    assert not list(tmp_path.glob("*.tmp.png"))
    with Image.open(shot) as im:
        assert im.size == (1200, 1600)
        # not a blank page: the summary table and text put many distinct colours on screen
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 50
