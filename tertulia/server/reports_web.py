"""Evaluation reports in the web app: the list (`/reports`, and `/api/reports` as JSON) and one report
(`/reports/{id}`), read-only, from the directories `tertulia eval` writes under TERTULIA_HOME/reports.

Pages are rendered here from each report's results.json with the same code that wrote its report.html
(all text escaped, charts as data URIs, no script), under the app's CSP: the stylesheet is linked, not
inlined.
"""

from __future__ import annotations

import asyncio
import html
import json
import re
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse, HTMLResponse

from tertulia import config as settings
from tertulia.server.auth_api import require_operator
from tertulia.server.errors import APIError
from tertulia.server.web import SECURITY_HEADERS

REPORT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


# Who may read them: as for /metrics, anyone on an open server, else a server key or any account.
Reader = Annotated[None, Depends(require_operator)]
router = APIRouter(include_in_schema=False)


def _summary(directory: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((directory / "results.json").read_text(encoding="utf-8"))
        return {
            "id": directory.name,
            "suite": data["suite"]["name"],
            "created": data["created"],
            "models": [m["label"] for m in data["models"]],
        }
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not a report, or one being written (its directory appears whole when done)


def list_reports() -> list[dict[str, Any]]:
    root = settings.reports_dir()
    found = [_summary(d) for d in root.iterdir() if d.is_dir() and REPORT_ID.fullmatch(d.name)]
    return sorted((r for r in found if r is not None), key=lambda r: r["created"], reverse=True)


def _directory(report_id: str) -> Path:
    if not REPORT_ID.fullmatch(report_id):
        raise APIError(404, "No such report.", type="not_found_error")
    directory = settings.reports_dir() / report_id
    if not (directory / "results.json").is_file():
        raise APIError(404, "No such report.", type="not_found_error")
    return directory


def _page(title: str, body: str) -> HTMLResponse:
    from tertulia.eval.report import document

    return HTMLResponse(document(html.escape(title), body, "/reports/report.css"), headers=SECURITY_HEADERS)


NAV = '<nav><a href="/">← Chat</a> · <a href="/reports">Reports</a></nav>'


@router.get("/api/reports")
async def reports_json(_: Reader) -> dict[str, Any]:
    return {"object": "list", "data": await asyncio.to_thread(list_reports)}


@router.get("/reports", response_class=HTMLResponse)
async def reports_page(_: Reader) -> HTMLResponse:
    reports = await asyncio.to_thread(list_reports)
    rows = "".join(
        f'<tr><td><a href="/reports/{html.escape(r["id"])}">{html.escape(r["suite"])}</a></td>'
        f"<td>{html.escape(r['created'])}</td><td>{html.escape(', '.join(r['models']))}</td></tr>"
        for r in reports
    )
    table = (
        f"<table><thead><tr><th>suite</th><th>when</th><th>models</th></tr></thead><tbody>{rows}</tbody></table>"
        if reports
        else "<p>No reports yet. Make one with <code>tertulia eval</code> (add "
        "<code>--compare MODEL</code> to compare models).</p>"
    )
    return _page("Evaluation reports", f"{NAV}<h1>Evaluation reports</h1>{table}")


@router.get("/reports/report.css")
async def stylesheet() -> FileResponse:
    from tertulia.eval.report import STYLESHEET

    return FileResponse(STYLESHEET, media_type="text/css", headers=SECURITY_HEADERS)


@router.get("/reports/{report_id}", response_class=HTMLResponse)
async def report_page(report_id: str, _: Reader) -> HTMLResponse:
    from tertulia.eval.report import blocks, chart_files, page

    directory = _directory(report_id)

    def render() -> str:
        data = json.loads((directory / "results.json").read_text(encoding="utf-8"))
        return page(blocks(data, chart_files(directory)), "/reports/report.css", NAV)

    try:
        text = await asyncio.to_thread(render)
    except (OSError, ValueError, KeyError, TypeError):
        raise APIError(404, "This report cannot be read.", type="not_found_error") from None
    return HTMLResponse(text, headers=SECURITY_HEADERS)
