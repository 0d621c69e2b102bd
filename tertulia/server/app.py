"""The FastAPI application: OpenAI-compatible /v1, the web app (/ and /api), /health and /metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

from tertulia import __version__
from tertulia.providers.local import ServedModel
from tertulia.server import (  # noqa: F401  (completions routes register on import)
    auth_api,
    completions_api,
    conversations_api,
    errors,
    openai_api,
    replies_api,
    web,
)
from tertulia.server.limits import LOOPBACK_HOSTS, BodyLimit, GuardMiddleware, HostGuard
from tertulia.server.metrics import CONTENT_TYPE, Metrics
from tertulia.server.throttle import LoginThrottle
from tertulia.store.accounts import Accounts
from tertulia.store.conversations import Store

SWAGGER_STATIC = "/docs-static"


def create_app(
    models: list[ServedModel],
    *,
    api_keys: set[str] | None = None,
    max_queue: int = 256,
    store: Store | None = None,
    auth: bool = False,
    allowed_hosts: frozenset[str] = LOOPBACK_HOSTS,
    public_metrics: bool = False,
    setup_token: str | None = None,
) -> FastAPI:
    """`api_keys`: when given, every /v1 route needs one (as a Bearer token); /health stays open.
    `max_queue`: requests in progress per model beyond which new ones get 429 + Retry-After.
    `store`: where conversations are kept (opened and migrated by the caller).
    `auth`: accounts (login, per-user API keys) instead of a single local user; needs `store`.
    `allowed_hosts`: the names in the Host header the server answers to ("*": any; see HostGuard).
    `public_metrics`: /metrics open even with keys or accounts (else it takes a key or a login).
    `setup_token`: with accounts and none made yet, what the first registration (the admin) needs."""
    if auth and store is None:
        raise ValueError("accounts need a store")
    accounts = Accounts(store) if auth and store is not None else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for model in models:
            model.start()
        app.state.ready = True
        try:
            yield
        finally:
            app.state.ready = False
            for model in models:
                model.stop()

    # The API's own pages are served below: /docs from the installed Swagger UI files (no CDN),
    # /openapi.json behind the same guard as /metrics.
    app = FastAPI(
        title="Tertulia",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.models = {m.name: m for m in models}
    app.state.started = int(time.time())
    app.state.ready = False
    app.state.max_queue = max_queue
    app.state.api_keys = frozenset(api_keys or ())
    app.state.public_metrics = public_metrics
    app.state.store = store
    app.state.accounts = accounts
    app.state.setup_token = setup_token
    app.state.setup_lock = asyncio.Lock()
    app.state.login_throttle = LoginThrottle()
    app.state.metrics = Metrics()
    for model in models:
        if isinstance(model, ServedModel):
            app.state.metrics.watch(model)
    app.add_middleware(BodyLimit)
    app.add_middleware(
        GuardMiddleware,
        api_keys=set(api_keys or ()),
        key_user=accounts.key_user if accounts is not None else None,
    )
    app.add_middleware(HostGuard, allowed_hosts=allowed_hosts)  # last added runs first
    errors.install(app)
    app.include_router(openai_api.router)
    app.include_router(auth_api.router)
    app.include_router(conversations_api.router)
    app.include_router(replies_api.router)
    web.mount(app)

    @app.get("/metrics", dependencies=[Depends(auth_api.require_operator)])
    async def metrics() -> Response:
        return Response(app.state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(auth_api.require_operator)])
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    app.mount(SWAGGER_STATIC, StaticFiles(directory=swagger_ui_path), name="swagger-ui")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="Tertulia API",
            swagger_js_url=f"{SWAGGER_STATIC}/swagger-ui-bundle.js",
            swagger_css_url=f"{SWAGGER_STATIC}/swagger-ui.css",
            swagger_favicon_url=f"{SWAGGER_STATIC}/favicon-32x32.png",
        )

    @app.get("/health")
    async def health() -> JSONResponse:
        if not app.state.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok", "models": list(app.state.models)})

    return app
