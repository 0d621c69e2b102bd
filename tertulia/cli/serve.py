"""`tertulia serve`: load the models, then run the API with uvicorn."""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import signal
import threading
from typing import Any

from rich.console import Console

from tertulia.cli.progress import LazyProgress
from tertulia.errors import TertuliaError
from tertulia.providers.base import Provider
from tertulia.providers.local import check_quantization
from tertulia.providers.spec import open_provider
from tertulia.store.accounts import Accounts
from tertulia.store.conversations import Store
from tertulia.store.database import open_store


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_hosts(bind: str, extra: list[str]) -> frozenset[str]:
    """The Host names to answer to: loopback's, the bound address, and any named by the operator
    (`--allow-host`, TERTULIA_ALLOWED_HOSTS). Bound to every interface (0.0.0.0, ::), with no name
    given, any name: such a server already requires API keys or accounts."""
    from tertulia.server.limits import LOOPBACK_HOSTS

    named = {h.strip() for h in extra} | {
        h.strip() for h in os.environ.get("TERTULIA_ALLOWED_HOSTS", "").split(",") if h.strip()
    }
    if bind in ("0.0.0.0", "::", "") and not named:
        return frozenset({"*"})
    return frozenset(LOOPBACK_HOSTS | {bind} | named)


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """'2GiB', '512MB', '1.5gb' or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise TertuliaError(f"Cannot read {text!r} as a size.", "Write it like 2GiB, 512MB or 1000000.")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise TertuliaError(f"A size must be more than zero bytes, not {text!r}.")
    return size


def run_server(
    *,
    models: list[str],
    host: str,
    port: int,
    max_batch: int,
    quantize: str,
    api_keys: list[str],
    max_queue: int,
    insecure: bool,
    kv_memory: str | None = None,
    database_url: str | None = None,
    auth: bool = False,
    allow_hosts: list[str] | None = None,
    public_metrics: bool = False,
) -> None:
    import uvicorn

    from tertulia.server.app import create_app

    check_quantization(quantize)
    kv_bytes = parse_size(kv_memory) if kv_memory else None
    keys = set(api_keys) | {
        k.strip() for k in os.environ.get("TERTULIA_API_KEYS", "").split(",") if k.strip()
    }
    if not _is_loopback(host) and not keys and not auth and not insecure:
        raise TertuliaError(
            f"Refusing to serve on {host} without API keys: anyone who can reach it could use it.",
            "Bind 127.0.0.1, or pass --insecure if the network is trusted.",
        )
    err = Console(stderr=True, highlight=False)
    # The store first: a wrong URL fails in a second, before models take their time to load.
    store = Store(open_store(database_url or os.environ.get("TERTULIA_DATABASE_URL")))
    interrupted = store.close_interrupted()
    if interrupted:
        err.print(f"{interrupted} reply(ies) cut short by the last shutdown were kept, marked incomplete.")
    setup_token = None
    if auth and not Accounts(store).has_accounts():
        setup_token = secrets.token_urlsafe(16)
    served: list[Provider] = []
    for spec in models:
        if not spec.startswith("remote:"):
            err.print(f"Loading {spec}…", style="dim")
        with LazyProgress(err) as progress:
            served.append(
                open_provider(
                    spec, quantization=quantize, max_batch=max_batch, kv_memory=kv_bytes, progress=progress
                )
            )
    names = [m.name for m in served]
    if len(set(names)) != len(names):
        raise TertuliaError(f"Two models share a name ({', '.join(names)}).", "Serve each model once.")
    shown = f"[{host}]" if ":" in host else host
    err.print(
        f"Tertulia serving {', '.join(names)}: chat at http://{shown}:{port}/", style="bold", soft_wrap=True
    )
    err.print(
        f"OpenAI-compatible API at http://{shown}:{port}/v1, docs at http://{shown}:{port}/docs",
        soft_wrap=True,
    )
    if setup_token is not None:
        err.print(
            f"No account yet. Create the admin at http://{shown}:{port}/?setup={setup_token} "
            "(this link works once; POST /api/auth/register with setup_token does the same).",
            style="bold yellow",
            soft_wrap=True,
        )
    hosts = allowed_hosts(host, allow_hosts or [])
    if "*" in hosts:
        err.print("Answering to any host name; name the public ones with --allow-host.", style="dim")
    app = create_app(
        served,
        api_keys=keys,
        max_queue=max_queue,
        store=store,
        auth=auth,
        allowed_hosts=hosts,
        public_metrics=public_metrics,
        setup_token=setup_token,
    )
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=10)
    _serve(uvicorn.Server(config), served)


def _serve(server: Any, served: list[Provider]) -> None:
    """HTTP in a background thread, the first engine loop on the main thread (see AsyncEngine.run_here)."""
    main_model, loop = next(((m, loop) for m in served if (loop := m.take_loop()) is not None), (None, None))
    if main_model is None or loop is None:
        server.run()
        return
    http = threading.Thread(target=server.run, name="tertulia-http", daemon=True)

    def request_exit(*_: object) -> None:
        server.should_exit = True

    def stop_engine_when_http_ends() -> None:
        http.join()
        main_model.stop()

    signal.signal(signal.SIGINT, request_exit)
    signal.signal(signal.SIGTERM, request_exit)
    http.start()
    threading.Thread(target=stop_engine_when_http_ends, daemon=True).start()
    loop()
