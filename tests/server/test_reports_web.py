"""Evaluation reports in the web app: listed, shown read-only under the app's CSP, nothing else
reachable through a report id, and guarded like the server's other workings."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from tertulia.engine.engine import Engine
from tertulia.providers.local import LocalProvider
from tertulia.server.app import create_app
from tertulia.server.web import CONTENT_SECURITY_POLICY
from tests.server.conftest import running


@pytest.fixture
def served(make_tiny_model) -> LocalProvider:
    return LocalProvider(Engine(make_tiny_model(), max_batch=2))


@pytest.fixture
def home(tmp_path: Path, eval_report: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TERTULIA_HOME", str(tmp_path))
    reports = tmp_path / "reports"
    shutil.copytree(eval_report, reports / eval_report.name)
    (reports / "not-a-report").mkdir()
    (reports / ".20261203-130000-x.partial").mkdir()  # a report being written: not listed
    return tmp_path


def test_list_and_show(served: LocalProvider, home: Path, eval_report: Path) -> None:
    with running(create_app([served])) as url, httpx.Client(base_url=url) as client:
        listed = client.get("/api/reports").json()["data"]
        assert [r["id"] for r in listed] == [eval_report.name]
        assert listed[0]["suite"] == "tiny" and len(listed[0]["models"]) == 2
        index = client.get("/reports")
        assert index.status_code == 200 and f'href="/reports/{eval_report.name}"' in index.text
        shown = client.get(f"/reports/{eval_report.name}")
        assert shown.status_code == 200
        assert shown.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        text = shown.text
        assert "<style" not in text and "<script" not in text.replace("&lt;script&gt;", "")
        assert (
            "&lt;script&gt;alert(1)&lt;/script&gt; hi" in text
            and "A &lt;small&gt; suite &amp; its report." in text
        )
        assert 'href="/reports/report.css"' in text and text.count("data:image/png;base64,") == 2
        assert client.get("/reports/report.css").headers["content-type"].startswith("text/css")


@pytest.mark.parametrize(
    "report_id", ["not-a-report", "..%2F..%2Fetc", ".20261203-130000-x.partial", "a%2F..%2F..", "x" * 300]
)
def test_unknown_ids_are_404(served: LocalProvider, home: Path, report_id: str) -> None:
    with running(create_app([served])) as url:
        response = httpx.get(f"{url}/reports/{report_id}")
        assert response.status_code == 404
        assert "Traceback" not in response.text


def test_reports_need_a_key_when_the_server_has_keys(
    served: LocalProvider, home: Path, eval_report: Path
) -> None:
    with running(create_app([served], api_keys={"k1"})) as url:
        for path in ("/api/reports", "/reports", f"/reports/{eval_report.name}"):
            assert httpx.get(f"{url}{path}").status_code == 401
            assert httpx.get(f"{url}{path}", headers={"Authorization": "Bearer k1"}).status_code == 200
