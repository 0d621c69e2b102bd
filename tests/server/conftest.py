"""A live Tertulia server on loopback (real embedded model, int4 as served by default), one per session."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from tertulia.providers.local import LocalProvider

MODEL = "smollm2-135m"


@dataclass
class LiveServer:
    url: str
    model: LocalProvider

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def wait_until_idle(self, timeout: float = 30.0) -> bool:
        """Until no request holds a KV block (a correctness wait, bounded; not a performance check)."""
        engine = self.model.engine
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if engine.idle:
                return True
            time.sleep(0.05)
        return False


def wait_until_serving(process: subprocess.Popen[str], url: str, timeout: float = 180.0) -> None:
    """Until a `tertulia serve` process answers /health (a 503 while the model loads means wait).

    Fails with the server's stderr if it exits, or if it is still not serving at the deadline (then it
    is stopped first, so that its log can be read to the end).
    """
    deadline = time.monotonic() + timeout
    while process.poll() is None:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            log = process.stderr.read() if process.stderr else ""
            pytest.fail(f"tertulia serve did not answer /health within {timeout:.0f} s:\n{log}")
        time.sleep(0.2)
    log = process.stderr.read() if process.stderr else ""
    pytest.fail(f"tertulia serve exited with code {process.returncode}:\n{log}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running(app: FastAPI) -> Iterator[str]:
    """Serve `app` with uvicorn on a free loopback port for the duration of the block; yields its URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    else:
        raise RuntimeError("server did not start")
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
