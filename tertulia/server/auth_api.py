"""Who is asking: the local user, or with --auth an account (session cookie or API key).

With --auth, a browser logs in and gets an HttpOnly, SameSite=Strict session cookie; every request that
changes something must also send the session's CSRF token in `X-CSRF-Token`, which a page on another
site cannot read. Programs use per-user API keys (`Authorization: Bearer tt-...`) on /v1 and /api.
The first account, the admin, is made by whoever holds the one-time setup token `tertulia serve`
prints (the server's operator), not by the first visitor; the token is consumed atomically, so two
registrations racing for it make one admin. After that, an admin creates accounts. Logins are
throttled (see throttle.py).
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from tertulia.errors import TertuliaError
from tertulia.server.errors import APIError
from tertulia.server.state import request_store, server_state
from tertulia.server.throttle import LoginThrottle, hashing
from tertulia.store.accounts import SESSION_DAYS, Accounts
from tertulia.store.schema import ApiKey, User

router = APIRouter(prefix="/api")

COOKIE = "tertulia_session"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


class Credentials(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, Field(min_length=1, max_length=200)]
    password: Annotated[str, Field(max_length=1024)]


class Registration(Credentials):
    setup_token: Annotated[str, Field(max_length=200)] | None = None  # the first account only


class KeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, Field(max_length=200)] = "key"


def _accounts(request: Request) -> Accounts:
    accounts = server_state(request).accounts
    if accounts is None:
        raise APIError(
            404, "Accounts are off: start the server with --auth to use them.", type="not_found_error"
        )
    return accounts


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    return header[7:].strip() if header.lower().startswith("bearer ") else None


async def require_operator(request: Request) -> None:
    """For what shows the server's workings (/metrics, /openapi.json): open on a server without keys
    or accounts; otherwise a server API key, or any account (key or logged-in session), unless the
    server was started with public metrics (then /metrics only is open)."""
    state = server_state(request)
    if state.public_metrics and request.url.path == "/metrics":
        return
    if state.accounts is None and not state.api_keys:
        return
    secret = _bearer(request) or ""
    if secret and any(hmac.compare_digest(secret, key) for key in state.api_keys):
        return
    if state.accounts is None:
        raise APIError(
            401, "Missing or invalid API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key"
        )
    await current_user(request)


async def current_user(request: Request) -> User | None:
    """The account behind this request (None without --auth); 401/403 when it has none or fails CSRF."""
    accounts = server_state(request).accounts
    if accounts is None:
        return None
    secret = _bearer(request)
    if secret:
        user = await asyncio.to_thread(accounts.key_user, secret)
        if user is None:
            raise APIError(401, "Invalid API key.", code="invalid_api_key")
        return user
    token = request.cookies.get(COOKIE)
    found = await asyncio.to_thread(accounts.session_user, token) if token else None
    if found is None:
        raise APIError(401, "Log in first.", code="not_logged_in")
    user, csrf = found
    if request.method not in SAFE_METHODS:
        sent = request.headers.get("x-csrf-token", "")
        if not hmac.compare_digest(sent, csrf):
            raise APIError(403, "Missing or wrong X-CSRF-Token header.", type="permission_error", code="csrf")
    return user


async def request_user(request: Request) -> str:
    """The id whose conversations this request may see and change."""
    user = await current_user(request)
    if user is not None:
        return user.id
    state = server_state(request)
    if state.local_user_id is None:
        store = request_store(state)
        state.local_user_id = (await asyncio.to_thread(store.local_user)).id
    return state.local_user_id


UserId = Annotated[str, Depends(request_user)]


def user_json(user: User) -> dict[str, Any]:
    return {"id": user.id, "name": user.name, "is_admin": user.is_admin, "disabled": user.disabled}


def key_json(key: ApiKey) -> dict[str, Any]:
    return {"id": key.id, "name": key.name, "prefix": key.prefix, "created_at": key.created_at.isoformat()}


@router.get("/auth/me")
async def me(request: Request) -> dict[str, Any]:
    """Who this browser is. Logged out is an answer here, not an error: the page then shows its login
    form, or the registration form while no account exists (`first_account`)."""
    accounts = server_state(request).accounts
    if accounts is None:
        return {"auth": False, "user": None}
    try:
        user = await current_user(request)
    except APIError as exc:
        if exc.status != 401:
            raise
        first = not await asyncio.to_thread(accounts.has_accounts)
        return {"auth": True, "user": None, "first_account": first}
    token = request.cookies.get(COOKIE)
    found = await asyncio.to_thread(accounts.session_user, token) if token else None
    return {"auth": True, "user": user_json(user), "csrf_token": found[1] if found else None}


@router.post("/auth/register", status_code=201)
async def register(body: Registration, request: Request) -> dict[str, Any]:
    accounts = _accounts(request)
    if await asyncio.to_thread(accounts.has_accounts):
        caller = await current_user(request)
        if caller is None or not caller.is_admin:
            raise APIError(403, "Only an admin can create accounts.", type="permission_error")
        return user_json(await _create(accounts, body))
    async with server_state(request).setup_lock:  # one registration at a time may spend the token
        expected = server_state(request).setup_token
        if expected is None or not hmac.compare_digest(body.setup_token or "", expected):
            raise APIError(
                403,
                "The first account is the admin: open the setup link `tertulia serve` printed.",
                type="permission_error",
                code="setup_token_required",
            )
        user = await _create(accounts, body)
        server_state(request).setup_token = None  # spent
    return user_json(user)


async def _create(accounts: Accounts, body: Credentials) -> User:
    try:
        return await hashing(accounts.create, body.name, body.password)
    except TertuliaError as exc:
        raise APIError(400, str(exc)) from None


@router.post("/auth/login")
async def login(body: Credentials, request: Request) -> JSONResponse:
    _check_throttle(request, body.name)
    found = await hashing(_accounts(request).login, body.name, body.password)
    if found is None:
        raise APIError(401, "Wrong user name or password.", code="invalid_credentials")
    server_state(request).login_throttle.succeeded(body.name)
    response = JSONResponse({"user": user_json(found.user), "csrf_token": found.csrf_token})
    response.set_cookie(
        COOKIE,
        found.token,
        max_age=SESSION_DAYS * 86400,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


def _check_throttle(request: Request, name: str) -> None:
    """429 before any hashing when this account or this client has tried too often (throttle.py)."""
    throttle: LoginThrottle = server_state(request).login_throttle
    address = request.client.host if request.client else "unknown"
    wait = throttle.retry_after(name, address)
    if wait:
        raise APIError(
            429,
            f"Too many password attempts. Try again in {wait} s.",
            type="rate_limit_error",
            code="login_throttled",
            retry_after=wait,
        )


@router.post("/auth/logout", status_code=204)
async def logout(request: Request) -> Response:
    await current_user(request)  # a logged-in browser, with its CSRF token
    token = request.cookies.get(COOKIE)
    if token:
        await asyncio.to_thread(_accounts(request).logout, token)
    response = Response(status_code=204)
    response.delete_cookie(COOKIE, path="/")
    return response


class PasswordChange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    current: Annotated[str, Field(max_length=1024)]
    new: Annotated[str, Field(max_length=1024)]


async def _logged_in(request: Request) -> User:
    user = await current_user(request)
    if user is None:
        raise APIError(
            404, "Accounts are off: start the server with --auth to use them.", type="not_found_error"
        )
    return user


async def _admin(request: Request) -> User:
    user = await _logged_in(request)
    if not user.is_admin:
        raise APIError(403, "Only an admin can do this.", type="permission_error")
    return user


@router.post("/auth/password", status_code=204)
async def change_password(body: PasswordChange, request: Request) -> Response:
    """Set a new password; every session ends (this browser's too): log in again everywhere.

    From a logged-in browser only: an API key must not be enough to guess the password and take
    the account over. Attempts are throttled like logins."""
    if _bearer(request):
        raise APIError(
            403, "Change the password from a logged-in browser, not with an API key.", type="permission_error"
        )
    user = await _logged_in(request)
    _check_throttle(request, user.name)
    try:
        await hashing(_accounts(request).change_password, user.id, body.current, body.new)
    except TertuliaError as exc:
        raise APIError(400, str(exc), param="current" if "current" in str(exc) else "new") from None
    server_state(request).login_throttle.succeeded(user.name)
    response = Response(status_code=204)
    response.delete_cookie(COOKIE, path="/")
    return response


@router.post("/auth/logout-everywhere", status_code=204)
async def logout_everywhere(request: Request) -> Response:
    """End every session of this account (a lost laptop, a shared computer); API keys stay."""
    user = await _logged_in(request)
    await asyncio.to_thread(_accounts(request).logout_everywhere, user.id)
    response = Response(status_code=204)
    response.delete_cookie(COOKIE, path="/")
    return response


@router.get("/users")
async def list_users(request: Request) -> list[dict[str, Any]]:
    await _admin(request)
    users = await asyncio.to_thread(_accounts(request).users)
    return [user_json(u) for u in users]


@router.post("/users/{user_id}/disable")
async def disable_user(user_id: str, request: Request) -> dict[str, Any]:
    """An admin disables an account: its sessions end, its keys and logins stop working; its
    conversations stay (enable it again with /enable)."""
    return await _set_disabled(request, user_id, True)


@router.post("/users/{user_id}/enable")
async def enable_user(user_id: str, request: Request) -> dict[str, Any]:
    return await _set_disabled(request, user_id, False)


async def _set_disabled(request: Request, user_id: str, disabled: bool) -> dict[str, Any]:
    await _admin(request)
    try:
        user = await asyncio.to_thread(_accounts(request).set_disabled, user_id, disabled)
    except TertuliaError as exc:
        raise APIError(400, str(exc)) from None
    if user is None:
        raise APIError(404, "No such account.", type="not_found_error")
    return user_json(user)


@router.get("/keys")
async def list_keys(request: Request) -> list[dict[str, Any]]:
    user = await current_user(request)
    if user is None:
        raise APIError(404, "Accounts are off: start the server with --auth to use per-user keys.")
    return [key_json(k) for k in await asyncio.to_thread(_accounts(request).keys, user.id)]


@router.post("/keys", status_code=201)
async def create_key(body: KeyRequest, request: Request) -> dict[str, Any]:
    user = await current_user(request)
    if user is None:
        raise APIError(404, "Accounts are off: start the server with --auth to use per-user keys.")
    key, secret = await asyncio.to_thread(_accounts(request).create_key, user.id, body.name)
    return dict(key_json(key), key=secret)


@router.delete("/keys/{key_id}", status_code=204)
async def revoke_key(key_id: str, request: Request) -> Response:
    user = await current_user(request)
    if user is None or not await asyncio.to_thread(_accounts(request).revoke_key, user.id, key_id):
        raise APIError(404, "No such key.", type="not_found_error")
    return Response(status_code=204)
