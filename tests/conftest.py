"""Shared pytest hooks."""

from __future__ import annotations

from typing import Any


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say loudly when the browser test could not run (no chromium on this machine)."""
    skipped = terminalreporter.stats.get("skipped", [])
    if any("NO BROWSER" in str(getattr(r, "longrepr", "")) for r in skipped):
        terminalreporter.write_sep("!", "HTML pages were NOT checked in a real browser", red=True)
        terminalreporter.write_line(
            "No chromium found: tests/test_html_browser.py was skipped. Install Debian's "
            "chromium (apt-get install chromium) to run it; CI does.",
            red=True,
        )
