"""Evaluation reports in the browser: reached from the chat, shown with their charts, under the CSP."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.e2e.conftest import WebServer

pytestmark = pytest.mark.slow


def test_from_the_chat_to_a_report(
    web: WebServer, page, eval_report: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("TERTULIA_HOME", str(tmp_path))
    shutil.copytree(eval_report, tmp_path / "reports" / eval_report.name)
    violations: list[str] = []
    page.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None)
    page.goto(web.url)
    page.get_by_role("link", name="Evaluation reports").click()
    page.wait_for_url("**/reports")
    page.get_by_role("link", name="tiny").click()
    page.wait_for_url(f"**/reports/{eval_report.name}")
    assert page.locator("h1").inner_text() == "Evaluation: tiny"
    charts = page.locator("img")
    assert charts.count() == 2
    for i in range(2):  # drawn, not blocked: data URIs are allowed images
        assert charts.nth(i).evaluate("img => img.complete && img.naturalWidth > 100")
    # The linked stylesheet applied (tables get borders), and nothing was refused by the CSP.
    assert page.locator("td").first.evaluate("td => getComputedStyle(td).borderTopStyle") == "solid"
    assert page.locator("text=<script>alert(1)</script> hi").count() == 1  # shown as text
    assert page.evaluate("typeof window.alert") == "function" and not violations
