"""A page in a real headless browser (Debian's chromium): drawn, tables visible, no errors.

The browser is installed by ``.ci/run``. Without one the test is skipped, loudly (see
``conftest.py``); with ``FLATCLI_REQUIRE_BROWSER=1`` (set by ``.ci/run``) a missing
browser fails it instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flatcli.html import render_html
from flatcli.report import to_json

from .results import audit_result, correlate_result, finetune_result, measure_result

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
NO_BROWSER = "NO BROWSER: install Debian's chromium (apt-get install chromium) to run this test"

# Runs before the page's own content and its Content-Security-Policy: it records every
# error (uncaught exceptions, console.error, CSP violations such as a blocked load) and,
# after the load, what a reader sees, into attributes of <html> that --dump-dom prints.
PROBE = """<script>
(function () {
  var errors = [];
  function note(what) {
    errors.push(String(what));
    document.documentElement.setAttribute("data-probe-errors", JSON.stringify(errors));
  }
  window.addEventListener("error", function (e) {
    note("error: " + (e.message || (e.target && (e.target.src || e.target.href)) || e));
  }, true);
  window.addEventListener("unhandledrejection", function (e) { note("rejection: " + e.reason); });
  document.addEventListener("securitypolicyviolation", function (e) {
    note("csp: " + e.violatedDirective + " " + e.blockedURI);
  });
  var consoleError = console.error;
  console.error = function () {
    note("console: " + Array.prototype.join.call(arguments, " "));
    consoleError.apply(console, arguments);
  };
  window.addEventListener("load", function () {
    var root = document.documentElement, out = {};
    var table = document.querySelector("table.sortable");
    var box = table.getBoundingClientRect(), style = getComputedStyle(table);
    out.table = {width: box.width, height: box.height, top: box.top,
                 visible: style.visibility === "visible" && style.display !== "none",
                 ready: table.getAttribute("data-sortable")};
    var images = Array.prototype.map.call(document.images, function (img) {
      return {complete: img.complete, width: img.naturalWidth,
              shown: img.getBoundingClientRect().width};
    });
    out.images = images;
    // Sort by the second column twice: ascending, then descending.
    var button = table.tHead.rows[0].cells[1].querySelector("button");
    function column() { return Array.prototype.map.call(table.tBodies[0].rows, function (r) {
      return r.cells[1].getAttribute("data-value"); }); }
    out.before = column();
    button.click(); out.ascending = column();
    button.click(); out.descending = column();
    out.sort = table.tHead.rows[0].cells[1].getAttribute("aria-sort");
    out.scrollWidth = document.documentElement.scrollWidth;
    root.setAttribute("data-probe", JSON.stringify(out));
    root.setAttribute("data-probe-errors", JSON.stringify(errors));
  });
})();
</script>"""


def browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("FLATCLI_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{NO_BROWSER} (FLATCLI_REQUIRE_BROWSER=1)")
    pytest.skip(NO_BROWSER)


def run_browser(exe: str, page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",  # CI runs as root, where chromium's sandbox cannot start
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--no-first-run",
        "--no-default-browser-check",
        "--hide-scrollbars",
        "--enable-logging=stderr",
        "--v=0",
        f"--user-data-dir={profile}",
        *args,
        page.as_uri(),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def console_errors(stderr: str) -> list[str]:
    """Console messages chromium logged at error level, or uncaught exceptions."""
    lines = [ln for ln in stderr.splitlines() if "CONSOLE" in ln]
    return [ln for ln in lines if "Uncaught" in ln or ":ERROR:CONSOLE" in ln]


def pixels(png: Path) -> np.ndarray:
    from matplotlib.image import imread

    return imread(png)


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("browser")
    out = {}
    kinds = (
        ("correlate", correlate_result()),
        ("measure", measure_result()),
        ("audit", audit_result()),
        ("finetune", finetune_result(tmp)),
    )
    for kind, result in kinds:
        text = render_html(json.loads(to_json(result)))
        charset = '<meta charset="utf-8">\n'  # the probe goes before the CSP <meta>
        probed = text.replace(charset, charset + PROBE + "\n", 1)
        assert probed != text
        path = tmp / f"{kind}.html"
        path.write_text(probed, encoding="utf-8")
        out[kind] = path
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["correlate", "measure", "audit", "finetune"])
def test_page_in_a_real_browser(pages: dict[str, Path], kind: str, tmp_path: Path) -> None:
    exe = browser()
    page = pages[kind]
    dom = run_browser(exe, page, tmp_path / "profile", "--dump-dom", "--virtual-time-budget=5000")
    assert dom.returncode == 0, dom.stderr[-2000:]
    probe = attribute(dom.stdout, "data-probe")
    errors = attribute(dom.stdout, "data-probe-errors")
    assert errors == [], errors
    assert console_errors(dom.stderr) == []
    table = probe["table"]
    assert table["visible"] and table["width"] > 300 and table["height"] > 60, table
    assert table["ready"] == "ready"  # the page's own script ran under its CSP
    assert len(probe["images"]) == {"correlate": 4, "measure": 0, "audit": 0, "finetune": 1}[kind]
    assert all(i["complete"] and i["width"] > 100 and i["shown"] > 100 for i in probe["images"])
    numbers = [float(v) for v in probe["ascending"] if v]
    assert numbers == sorted(numbers) and len(numbers) >= 2
    assert [float(v) for v in probe["descending"] if v] == sorted(numbers, reverse=True)
    assert probe["sort"] == "descending"
    # Screenshots of the two pages that use every kind of block (the others share them).
    for width in (1280, 390) if kind in ("correlate", "measure") else ():
        shot = tmp_path / f"{kind}-{width}.png"
        run = run_browser(
            exe, page, tmp_path / "profile", f"--screenshot={shot}", f"--window-size={width},1800"
        )
        assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
        assert console_errors(run.stderr) == []
        img = pixels(shot)
        assert img.shape[:2] == (1800, width)
        flat = img.reshape(-1, img.shape[-1])
        assert len(np.unique(flat[:: max(1, len(flat) // 50_000)], axis=0)) > 20, "blank page"
        # Dark pixels (text, table rules) in the top half: something is drawn there.
        assert (img[:900, :, :3].mean(axis=-1) < 0.5).mean() > 0.005


@pytest.mark.slow
def test_the_probe_sees_errors_and_blocked_loads(pages: dict[str, Path], tmp_path: Path) -> None:
    """The checks above can fail: a thrown error, a blocked load and a blocked script show."""
    exe = browser()
    text = pages["measure"].read_text(encoding="utf-8")
    text = text.replace("</script>\n", "</script>\n<script>null.boom;</script>\n", 1)
    text = text.replace(
        "</main>", '<img src="http://example.invalid/x.png" alt="x"><script>1;</script></main>', 1
    )
    bad = tmp_path / "bad.html"
    bad.write_text(text, encoding="utf-8")
    dom = run_browser(exe, bad, tmp_path / "profile", "--dump-dom", "--virtual-time-budget=5000")
    errors = " | ".join(attribute(dom.stdout, "data-probe-errors"))
    assert "TypeError" in errors, errors
    assert "csp: img-src http://example.invalid/x.png" in errors, errors
    assert "csp: script-src-elem inline" in errors, errors
    assert any("TypeError" in ln for ln in console_errors(dom.stderr)), dom.stderr[-2000:]


def attribute(dom: str, name: str) -> Any:
    match = re.search(rf'{name}="([^"]*)"', dom)
    assert match, f"{name} missing: the probe did not run\n{dom[:500]}"
    import html

    return json.loads(html.unescape(match.group(1)))
