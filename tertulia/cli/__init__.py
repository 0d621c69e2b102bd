"""Command-line interface (typer). `main` turns user-facing errors into one line and exit code 1."""

from __future__ import annotations

import sys

from tertulia.errors import TertuliaError


def main() -> None:
    from tertulia.cli.app import app

    try:
        app()
    except TertuliaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
