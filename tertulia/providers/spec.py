"""Which provider a `--model` value names, opened."""

from __future__ import annotations

import os

from tertulia.models.gguf import Progress
from tertulia.providers.base import Provider
from tertulia.providers.local import LocalProvider


def open_provider(
    spec: str | None,
    *,
    quantization: str = "auto",
    max_batch: int = 8,
    kv_memory: int | None = None,
    progress: Progress | None = None,
    inline: bool = False,
) -> Provider:
    """`remote:NAME@URL` reaches another server (its key from TERTULIA_REMOTE_API_KEY); anything
    else loads weights here."""
    if spec is not None and spec.startswith("remote:"):
        # Imported here: its HTTP client costs a local start (`tertulia chat -p`) 40 ms for nothing.
        from tertulia.providers.remote import RemoteProvider

        return RemoteProvider.from_spec(spec, os.environ.get("TERTULIA_REMOTE_API_KEY"))
    return LocalProvider.load(
        spec,
        quantization=quantization,
        max_batch=max_batch,
        kv_memory=kv_memory,
        progress=progress,
        inline=inline,
    )
