"""Guards in front of the routes: API keys, request size, and a bounded queue (429 past it)."""

from __future__ import annotations

import hmac
from collections.abc import Callable

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tertulia.server.errors import APIError, envelope

# JSON bodies larger than this are refused before they are read (a long chat is a few hundred KB).
MAX_BODY_BYTES = 4 * 1024 * 1024


class GuardMiddleware:
    """API keys on /v1 (when configured) and a body-size limit, answered in OpenAI's error shape.

    With accounts (`key_user`), /v1 also takes any user's API key, and /api is left to the routes
    (session cookie or key, see auth_api). Without accounts, /api is guarded by the server's keys.

    Plain ASGI rather than Starlette's BaseHTTPMiddleware: that one passes every chunk of a streamed
    response through a memory stream between two tasks, a cost paid per token on every stream.
    """

    def __init__(
        self,
        app: ASGIApp,
        api_keys: set[str],
        key_user: Callable[[str], object | None] | None = None,
        max_body: int = MAX_BODY_BYTES,
    ) -> None:
        self.app = app
        self.api_keys = api_keys
        self.key_user = key_user
        self.max_body = max_body

    def _allowed(self, token: str) -> bool:
        if any(hmac.compare_digest(token, key) for key in self.api_keys):
            return True
        return self.key_user is not None and bool(token) and self.key_user(token) is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = await self._refusal(Headers(scope=scope), scope["path"])
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _refusal(self, headers: Headers, path: str) -> Response | None:
        guarded = path.startswith("/v1") and (self.api_keys or self.key_user is not None)
        guarded = guarded or (path.startswith("/api") and self.api_keys and self.key_user is None)
        if guarded:
            header = headers.get("authorization", "")
            token = header[7:].strip() if header.lower().startswith("bearer ") else ""
            if not await run_in_threadpool(self._allowed, token):
                return envelope(
                    401,
                    "Missing or invalid API key: send 'Authorization: Bearer <key>'.",
                    "invalid_request_error",
                    code="invalid_api_key",
                )
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return envelope(413, too_large(self.max_body), "invalid_request_error")
        return None


def too_large(limit: int) -> str:
    return f"The request body exceeds {limit // (1024 * 1024)} MB."


class BodyLimit:
    """Count the bytes of bodies sent without a Content-Length (chunked): stop reading past the limit.

    The error is raised while the route reads its body, before any response has started; FastAPI lets
    an HTTPException through its body parsing, and the error handlers turn it into OpenAI's envelope.
    """

    def __init__(self, app: ASGIApp, max_body: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise HTTPException(413, too_large(self.max_body))
            return message

        await self.app(scope, counted, send)


def check_queue(pending: int, limit: int) -> None:
    """Refuse new work when `limit` requests already wait or run on this model."""
    if pending >= limit:
        raise APIError(
            429,
            f"The server is busy ({pending} requests in progress). Retry shortly.",
            type="rate_limit_error",
            code="server_busy",
        )


# Names a server bound to loopback answers to: a page on another name that resolves to 127.0.0.1
# (DNS rebinding) is refused, because its requests carry that other name in their Host header.
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def hostname(netloc: str) -> str:
    """'example.com:8000' -> 'example.com', '[::1]:8000' -> '::1' (lower case)."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        return netloc[1 : netloc.find("]")] if "]" in netloc else netloc
    return netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc


class HostGuard:
    """Answer only to the names the server was started for, and refuse cross-site writes.

    - `Host` must name an allowed host (`*` allows any): a web page cannot rebind its own name to
      this machine and read or change what is here (the attack class of Ollama's CVE-2024-28224).
    - A request that changes something (not GET/HEAD/OPTIONS) and carries an `Origin` header (browsers
      send it) must come from this very host and port, or from a public name the operator allowed:
      another site's page (or another port's, on loopback) cannot post to it. Programs such as the
      `openai` client send no Origin and are unaffected.

    Behind a reverse proxy, allow the public name (`--allow-host`) or have the proxy pass `Host` on.
    """

    def __init__(self, app: ASGIApp, allowed_hosts: frozenset[str] = LOOPBACK_HOSTS) -> None:
        self.app = app
        self.allowed = frozenset(hostname(h) for h in allowed_hosts)
        # Pages that may write from another origin than the Host: the public names an operator gave
        # (a proxy that does not pass Host on). Never loopback's other ports, never "any".
        self.trusted_origins = self.allowed - LOOPBACK_HOSTS - {"*"}

    def _allowed(self, name: str) -> bool:
        return "*" in self.allowed or name in self.allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # /health answers whatever the name: load balancers probe it by address.
        if scope["type"] != "http" or scope["path"] == "/health":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        refusal = None
        if not self._allowed(hostname(host)):
            refusal = envelope(
                400,
                f"This server does not answer to the name '{hostname(host)}'. If it is yours (a reverse "
                "proxy, another hostname), start the server with --allow-host for it.",
                "invalid_request_error",
                code="host_not_allowed",
            )
        elif scope["method"] not in _SAFE_METHODS and "origin" in headers:
            origin = headers["origin"]
            netloc = origin.split("://", 1)[1] if "://" in origin else ""
            same_origin = bool(netloc) and netloc.lower() == host.lower()
            if not same_origin and hostname(netloc) not in self.trusted_origins:
                refusal = envelope(
                    403,
                    f"Requests from the page at {origin} may not change anything here.",
                    "invalid_request_error",
                    code="cross_origin_refused",
                )
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)
