"""Accounts for `tertulia serve --auth`: passwords, login sessions and API keys.

Passwords are hashed with Argon2id (argon2-cffi's defaults: 64 MiB, 3 passes). Session tokens and API
keys are random 256-bit secrets given to the client once; the database keeps only their SHA-256, so a
leaked database opens no session and no key. The first account created becomes the admin.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, func, select

from tertulia.errors import TertuliaError
from tertulia.store.conversations import Store
from tertulia.store.schema import ApiKey, LoginSession, User, now

SESSION_DAYS = 30
KEY_PREFIX = "tt-"
MIN_PASSWORD = 8

_hasher = PasswordHasher()


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass
class Login:
    user: User
    token: str  # for the cookie
    csrf_token: str  # for the X-CSRF-Token header of state-changing requests


class Accounts:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.db = store.db

    def create(self, name: str, password: str) -> User:
        """A new account; the first one is the admin."""
        name = name.strip()
        if not name or len(name) > 200:
            raise TertuliaError("A user name is 1 to 200 characters.")
        if len(password) < MIN_PASSWORD:
            raise TertuliaError(f"A password needs at least {MIN_PASSWORD} characters.")
        with self.db.session() as s:
            first = s.scalar(select(User.id).where(User.password_hash.is_not(None)).limit(1)) is None
        return self.store.create_user(name, _hasher.hash(password), is_admin=first)

    def has_accounts(self) -> bool:
        with self.db.session() as s:
            return s.scalar(select(User.id).where(User.password_hash.is_not(None)).limit(1)) is not None

    def login(self, name: str, password: str) -> Login | None:
        user = self.store.user_by_name(name.strip())
        try:
            if user is None or user.password_hash is None or user.disabled:
                _hasher.hash(password)  # same work as a real check: timing does not reveal names
                return None
            _hasher.verify(user.password_hash, password)
        except (VerificationError, InvalidHashError):
            return None
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        with self.db.session() as s:
            s.add(
                LoginSession(
                    id=_digest(token),
                    user_id=user.id,
                    csrf_token=csrf,
                    expires_at=now() + timedelta(days=SESSION_DAYS),
                )
            )
        return Login(user, token, csrf)

    def session_user(self, token: str) -> tuple[User, str] | None:
        """The user and CSRF token of a live session, or None."""
        with self.db.session() as s:
            session = s.get(LoginSession, _digest(token))
            if session is None:
                return None
            expires = session.expires_at
            if expires.tzinfo is None:  # SQLite returns naive datetimes (stored in UTC)
                expires = expires.replace(tzinfo=now().tzinfo)
            if expires < now():
                s.delete(session)
                return None
            user = s.get(User, session.user_id)
            if user is None or user.disabled:
                return None
            return user, session.csrf_token

    def logout(self, token: str) -> None:
        with self.db.session() as s:
            s.execute(delete(LoginSession).where(LoginSession.id == _digest(token)))

    def logout_everywhere(self, user_id: str) -> int:
        """End every session of the user (all browsers); returns how many there were."""
        with self.db.session() as s:
            return s.execute(delete(LoginSession).where(LoginSession.user_id == user_id)).rowcount

    def change_password(self, user_id: str, current: str, new: str) -> None:
        """Check the current password, set the new one, and end every session (log in again)."""
        if len(new) < MIN_PASSWORD:
            raise TertuliaError(f"A password needs at least {MIN_PASSWORD} characters.")
        with self.db.session() as s:
            user = s.get(User, user_id)
            try:
                if user is None or user.password_hash is None:
                    raise VerificationError
                _hasher.verify(user.password_hash, current)
            except (VerificationError, InvalidHashError):
                raise TertuliaError("The current password is wrong.") from None
            user.password_hash = _hasher.hash(new)
            s.execute(delete(LoginSession).where(LoginSession.user_id == user_id))

    def set_disabled(self, user_id: str, disabled: bool) -> User | None:
        """Disable (or enable again) an account; disabling ends its sessions. Its keys stop working
        while it is disabled. The last enabled admin cannot be disabled."""
        with self.db.session() as s:
            user = s.get(User, user_id)
            if user is None or user.password_hash is None:
                return None
            if disabled and user.is_admin:
                admins = s.scalar(
                    select(func.count()).select_from(User).where(User.is_admin, User.disabled.is_(False))
                )
                if admins <= 1:
                    raise TertuliaError("This is the only admin: make another admin first.")
            user.disabled = disabled
            if disabled:
                s.execute(delete(LoginSession).where(LoginSession.user_id == user_id))
            return user

    def users(self) -> list[User]:
        with self.db.session() as s:
            return list(
                s.scalars(select(User).where(User.password_hash.is_not(None)).order_by(User.created_at))
            )

    # --- API keys -----------------------------------------------------------------------------
    def create_key(self, user_id: str, name: str) -> tuple[ApiKey, str]:
        """A new key; the secret is returned here and never again."""
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        with self.db.session() as s:
            key = ApiKey(
                user_id=user_id, name=name[:200] or "key", key_hash=_digest(secret), prefix=secret[:10]
            )
            s.add(key)
        return key, secret

    def keys(self, user_id: str) -> list[ApiKey]:
        with self.db.session() as s:
            return list(
                s.scalars(select(ApiKey).where(ApiKey.user_id == user_id).order_by(ApiKey.created_at))
            )

    def revoke_key(self, user_id: str, key_id: str) -> bool:
        with self.db.session() as s:
            result = s.execute(delete(ApiKey).where(ApiKey.id == key_id, ApiKey.user_id == user_id))
            return bool(result.rowcount)

    def key_user(self, secret: str) -> User | None:
        if not secret.startswith(KEY_PREFIX):
            return None
        with self.db.session() as s:
            key = s.scalar(select(ApiKey).where(ApiKey.key_hash == _digest(secret)))
            user = s.get(User, key.user_id) if key is not None else None
            return user if user is not None and not user.disabled else None
