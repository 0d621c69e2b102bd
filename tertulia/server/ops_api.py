"""The server's own pages: /health for load balancers, /metrics for Prometheus, the API's docs.

/metrics and /openapi.json show the server's workings, so they take what `require_operator` asks;
/docs is the Swagger UI from the installed package (no CDN) and reads /openapi.json with the
visitor's own credentials.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

from tertulia.server.auth_api import require_operator
from tertulia.server.metrics import CONTENT_TYPE
from tertulia.server.state import State

SWAGGER_STATIC = "/docs-static"

router = APIRouter()


@router.get("/health")
async def health(state: State) -> JSONResponse:
    if not state.ready:
        return JSONResponse({"status": "loading"}, status_code=503)
    return JSONResponse({"status": "ok", "models": list(state.models)})


@router.get("/metrics", dependencies=[Depends(require_operator)])
async def metrics(state: State) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require_operator)])
async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs", include_in_schema=False)
async def docs() -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="Tertulia API",
        swagger_js_url=f"{SWAGGER_STATIC}/swagger-ui-bundle.js",
        swagger_css_url=f"{SWAGGER_STATIC}/swagger-ui.css",
        swagger_favicon_url=f"{SWAGGER_STATIC}/favicon-32x32.png",
    )


def mount(app: FastAPI) -> None:
    app.include_router(router)
    app.mount(SWAGGER_STATIC, StaticFiles(directory=swagger_ui_path), name="swagger-ui")
