"""The FastAPI application: OpenAI-compatible /v1, the web app (/ and /api), /health and /metrics."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

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
from tertulia.server.limits import BodyLimit, GuardMiddleware
from tertulia.server.metrics import CONTENT_TYPE, Metrics
from tertulia.store.accounts import Accounts
from tertulia.store.conversations import Store


def create_app(
    models: list[ServedModel],
    *,
    api_keys: set[str] | None = None,
    max_queue: int = 256,
    store: Store | None = None,
    auth: bool = False,
) -> FastAPI:
    """`api_keys`: when given, every /v1 route needs one (as a Bearer token); /health stays open.
    `max_queue`: requests in progress per model beyond which new ones get 429 + Retry-After.
    `store`: where conversations are kept (opened and migrated by the caller).
    `auth`: accounts (login, per-user API keys) instead of a single local user; needs `store`."""
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

    app = FastAPI(title="Tertulia", version=__version__, lifespan=lifespan)
    app.state.models = {m.name: m for m in models}
    app.state.started = int(time.time())
    app.state.ready = False
    app.state.max_queue = max_queue
    app.state.store = store
    app.state.accounts = accounts
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
    errors.install(app)
    app.include_router(openai_api.router)
    app.include_router(auth_api.router)
    app.include_router(conversations_api.router)
    app.include_router(replies_api.router)
    web.mount(app)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(app.state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/health")
    async def health() -> JSONResponse:
        if not app.state.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok", "models": list(app.state.models)})

    return app
