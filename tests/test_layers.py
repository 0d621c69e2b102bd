"""The package keeps the shape DESIGN.md draws: the contracts in pyproject.toml, checked by import-linter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_imports_keep_the_layers() -> None:
    linter = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(linter), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout and "5 kept" in done.stdout


@pytest.mark.parametrize(
    "leak, source, broken",
    [
        ("store", "from tertulia.engine import sampling  # noqa\n", "tertulia.store.leak -> tertulia.engine"),
        ("server", "from tertulia.engine import engine  # noqa\n", "Only the providers import the engine"),
        (
            "models",
            "from tertulia.providers import base  # noqa\n",
            "tertulia.models.leak -> tertulia.providers",
        ),
    ],
)
def test_a_layer_violation_is_caught(tmp_path: Path, leak: str, source: str, broken: str) -> None:
    """The check can fail: a store or server module importing the engine, or the models importing
    the providers, breaks a contract."""
    package = tmp_path / "tertulia"
    subprocess.run(["cp", "-r", str(ROOT / "tertulia"), str(package)], check=True)
    (package / leak / "leak.py").write_text(source)
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    linter = Path(sys.executable).with_name("lint-imports")
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [str(linter), "--no-cache"], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode != 0 and broken in done.stdout, done.stdout
