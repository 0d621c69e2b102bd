"""Every error leaves the server in OpenAI's envelope: {"error": {message, type, param, code}}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from tertulia.errors import PromptError, TertuliaError
from tertulia.providers.base import ProviderError

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after: int = 1,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.retry_after = retry_after  # seconds, sent with a 429


def envelope(
    status: int, message: str, type: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {}
    location = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(location) or None
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON.", None
    message = first.get("msg", "Invalid request.").removeprefix("Value error, ")
    return (f"{param}: {message}" if param else message), param


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        response = envelope(exc.status, exc.message, exc.type, exc.param, exc.code)
        if exc.status == 429:
            response.headers["Retry-After"] = str(exc.retry_after)
        return response

    @app.exception_handler(ProviderError)
    async def provider_error(_: Request, exc: ProviderError) -> JSONResponse:
        # A remote model's own error keeps its status (a 400 is still the client's fault); a
        # failure to reach it is a 502.
        return JSONResponse(exc.body, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return envelope(400, message, "invalid_request_error", param)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return envelope(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(PromptError)
    async def prompt_error(_: Request, exc: PromptError) -> JSONResponse:
        param = exc.param or (None if exc.code == "invalid_value" else "messages")
        return envelope(400, str(exc), "invalid_request_error", param, exc.code)

    @app.exception_handler(TertuliaError)
    async def tertulia_error(_: Request, exc: TertuliaError) -> JSONResponse:
        return envelope(400, str(exc), "invalid_request_error")

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return envelope(500, "The server had an error while processing the request.", "server_error")
