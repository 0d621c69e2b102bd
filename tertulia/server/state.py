"""What the server holds for its routes, reached through FastAPI dependencies (`State`, `StoreDep`).

Routes declare what they need as parameters; nothing else reads `app.state`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request

from tertulia.providers.base import Provider
from tertulia.server.errors import APIError
from tertulia.server.metrics import Metrics
from tertulia.server.throttle import LoginThrottle
from tertulia.store.accounts import Accounts
from tertulia.store.conversations import NotFound, Store

T = TypeVar("T")


@dataclass
class ServerState:
    models: dict[str, Provider]
    started: int
    max_queue: int
    api_keys: frozenset[str]
    public_metrics: bool
    store: Store | None
    accounts: Accounts | None
    setup_token: str | None  # with accounts and none made yet: what registering the admin needs
    metrics: Metrics
    login_throttle: LoginThrottle = field(default_factory=LoginThrottle)
    setup_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    ready: bool = False
    local_user_id: str | None = None  # without accounts, whose rows every request sees


def server_state(request: Request) -> ServerState:
    return request.app.state.server


State = Annotated[ServerState, Depends(server_state)]


def request_store(state: State) -> Store:
    if state.store is None:
        raise APIError(404, "This server keeps no conversations (it was started without a store).")
    return state.store


StoreDep = Annotated[Store, Depends(request_store)]


async def in_thread(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """A store call off the event loop; NotFound becomes a 404 in OpenAI's error shape."""
    try:
        return await asyncio.to_thread(call, *args, **kwargs)
    except NotFound as exc:
        raise APIError(404, exc.message, type="not_found_error") from None
