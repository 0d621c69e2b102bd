"""Login throttling: password guesses are slow and few, and cannot stall the server for others.

Two sliding windows: attempts without success per account name (a guesser trying one account), and
attempts per client address (one client trying many). Past either, the answer is 429 with
Retry-After, before any password is hashed. Each Argon2 hash takes ~64 MiB and tens of milliseconds
of a core, so hashing runs on a small pool of its own: a burst of logins waits there instead of
filling the worker threads the store and the tokenizer use.

A throttled account name does lock out its owner for the window, too: the price of refusing guesses
without CAPTCHAs; the window is short. Behind a reverse proxy every client has the proxy's address
and shares its window: rate-limit per client at the proxy. State lives in memory (one process),
bounded in size.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

FAILURES_PER_ACCOUNT = 5
ATTEMPTS_PER_ADDRESS = 20
WINDOW_SECONDS = 60.0
MAX_TRACKED = 10_000  # names and addresses remembered; the oldest are forgotten first

_HASHING = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tertulia-argon2")


async def hashing(work: Callable[..., T], *args: object) -> T:
    """Run password hashing (login, registration, password change) on its own pool."""
    return await asyncio.get_running_loop().run_in_executor(_HASHING, work, *args)


class _Windows:
    """Event times per key within the last WINDOW_SECONDS."""

    def __init__(self, limit: int, clock: Callable[[], float]) -> None:
        self.limit = limit
        self.clock = clock
        self.events: OrderedDict[str, deque[float]] = OrderedDict()

    def wait(self, key: str) -> float:
        """Seconds until `key` may try again (0: now)."""
        times = self.events.get(key)
        if not times:
            return 0.0
        horizon = self.clock() - WINDOW_SECONDS
        while times and times[0] <= horizon:
            times.popleft()
        return 0.0 if len(times) < self.limit else times[0] - horizon

    def add(self, key: str) -> None:
        self.events.setdefault(key, deque()).append(self.clock())
        self.events.move_to_end(key)
        while len(self.events) > MAX_TRACKED:
            self.events.popitem(last=False)

    def clear(self, key: str) -> None:
        self.events.pop(key, None)


class LoginThrottle:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.accounts = _Windows(FAILURES_PER_ACCOUNT, clock)
        self.addresses = _Windows(ATTEMPTS_PER_ADDRESS, clock)

    def retry_after(self, name: str, address: str) -> int:
        """Whole seconds to wait before this attempt may be made (0: go ahead). An attempt counts as
        a failure of its account until it succeeds, so that parallel guesses are counted as they
        start, not when their hashes are done."""
        account = name.strip().lower()
        wait = max(self.accounts.wait(account), self.addresses.wait(address))
        if wait > 0:
            return max(1, math.ceil(wait))
        self.addresses.add(address)
        self.accounts.add(account)
        return 0

    def succeeded(self, name: str) -> None:
        self.accounts.clear(name.strip().lower())
