"""The package keeps the shape DESIGN.md draws: the contracts in pyproject.toml, checked by import-linter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_imports_keep_the_layers() -> None:
    linter = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(linter), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout and "3 kept" in done.stdout


def test_a_layer_violation_is_caught(tmp_path: Path) -> None:
    """The check can fail: a store module that imports the engine breaks its contract."""
    package = tmp_path / "tertulia"
    subprocess.run(["cp", "-r", str(ROOT / "tertulia"), str(package)], check=True)
    (package / "store" / "leak.py").write_text("from tertulia.engine import sampling  # noqa\n")
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    linter = Path(sys.executable).with_name("lint-imports")
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [str(linter), "--no-cache"], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode != 0 and "tertulia.store.leak -> tertulia.engine" in done.stdout, done.stdout
