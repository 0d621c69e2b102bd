"""Guards in front of the routes: API keys, request size, and a bounded queue (429 past it)."""

from __future__ import annotations

import hmac

from fastapi import Request
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.responses import Response

from tertulia.server.errors import APIError, envelope

# JSON bodies larger than this are refused before they are read (a long chat is a few hundred KB).
MAX_BODY_BYTES = 4 * 1024 * 1024


class GuardMiddleware(BaseHTTPMiddleware):
    """API keys on /v1 (when configured) and a body-size limit, answered in OpenAI's error shape."""

    def __init__(self, app, api_keys: set[str], max_body: int = MAX_BODY_BYTES) -> None:  # type: ignore[no-untyped-def]
        super().__init__(app)
        self.api_keys = api_keys
        self.max_body = max_body

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        if self.api_keys and request.url.path.startswith("/v1"):
            header = request.headers.get("authorization", "")
            token = header[7:].strip() if header.lower().startswith("bearer ") else ""
            if not any(hmac.compare_digest(token, key) for key in self.api_keys):
                return envelope(
                    401,
                    "Missing or invalid API key: send 'Authorization: Bearer <key>'.",
                    "invalid_request_error",
                    code="invalid_api_key",
                )
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return envelope(
                413, f"The request body exceeds {self.max_body // (1024 * 1024)} MB.", "invalid_request_error"
            )
        return await call_next(request)


def check_queue(pending: int, limit: int) -> None:
    """Refuse new work when `limit` requests already wait or run on this model."""
    if pending >= limit:
        raise APIError(
            429,
            f"The server is busy ({pending} requests in progress). Retry shortly.",
            type="rate_limit_error",
            code="server_busy",
        )
