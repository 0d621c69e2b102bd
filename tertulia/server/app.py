"""The FastAPI application: OpenAI-compatible /v1, the web app (/ and /api), /health and /metrics.

Every route module is registered here, by name; routes reach what the server holds through the
dependencies in `state.py`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI

from tertulia import __version__
from tertulia.providers.base import Provider
from tertulia.server import (
    auth_api,
    completions_api,
    conversations_api,
    errors,
    openai_api,
    ops_api,
    replies_api,
    reports_web,
    web,
)
from tertulia.server.limits import LOOPBACK_HOSTS, BodyLimit, GuardMiddleware, HostGuard
from tertulia.server.metrics import Metrics
from tertulia.server.state import ServerState
from tertulia.store.accounts import Accounts
from tertulia.store.conversations import Store


def create_app(
    models: Sequence[Provider],
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
    state = ServerState(
        models={m.name: m for m in models},
        started=int(time.time()),
        max_queue=max_queue,
        api_keys=frozenset(api_keys or ()),
        public_metrics=public_metrics,
        store=store,
        accounts=accounts,
        setup_token=setup_token,
        metrics=Metrics(),
    )
    for model in models:
        state.metrics.watch(model)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for model in models:
            model.start()
        state.ready = True
        try:
            yield
        finally:
            state.ready = False
            for model in models:
                model.stop()

    # The API's own pages are served by ops_api: /docs from the installed Swagger UI files (no CDN),
    # /openapi.json behind the same guard as /metrics.
    app = FastAPI(
        title="Tertulia",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.server = state
    app.add_middleware(BodyLimit)
    app.add_middleware(
        GuardMiddleware,
        api_keys=set(api_keys or ()),
        key_user=accounts.key_user if accounts is not None else None,
    )
    app.add_middleware(HostGuard, allowed_hosts=allowed_hosts)  # last added runs first
    errors.install(app)
    for router in (
        openai_api.router,
        completions_api.router,
        auth_api.router,
        conversations_api.router,
        replies_api.router,
        reports_web.router,
    ):
        app.include_router(router)
    ops_api.mount(app)
    web.mount(app)
    return app
