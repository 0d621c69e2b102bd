"""llama.cpp's own `llama-server`, built from source for this CPU: the peer the serving figures meet.

    python benchmarks/llama_cpp.py build     # once; `make bench` does it
    python benchmarks/llama_cpp.py info      # what was built, and with which instruction sets

The source is the llama.cpp that the llama-cpp-python 0.3.36 sdist vendors (from PyPI, checked against
its published sha256), built offline with cmake. Instruction sets are chosen from /proc/cpuinfo, every
one the CPU has (AVX2, FMA, F16C, BMI2, AVX-VNNI, AVX-512 F/VBMI/VNNI/BF16, AMX); the binary is then
run on the benchmark's GGUF, and if it crashes, the newest sets are turned off one at a time until it
does not. What was turned off, and why, is recorded beside the binary (`build.json`) and in every
result that uses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOME = ROOT / "build" / "llama.cpp"
SDIST = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SERVER = HOME / "build" / "bin" / "llama-server"
INFO = HOME / "build.json"

# cmake option -> the /proc/cpuinfo flags it needs. Listed oldest first: a build that crashes turns the
# newest off first.
INSTRUCTION_SETS: list[tuple[str, tuple[str, ...]]] = [
    ("GGML_AVX", ("avx",)),
    ("GGML_AVX2", ("avx2",)),
    ("GGML_FMA", ("fma",)),
    ("GGML_F16C", ("f16c",)),
    ("GGML_BMI2", ("bmi2",)),
    ("GGML_AVX512", ("avx512f",)),
    ("GGML_AVX512_VBMI", ("avx512vbmi",)),
    ("GGML_AVX512_VNNI", ("avx512_vnni",)),
    ("GGML_AVX_VNNI", ("avx_vnni",)),
    ("GGML_AVX512_BF16", ("avx512_bf16",)),
    ("GGML_AMX_TILE", ("amx_tile",)),
    ("GGML_AMX_INT8", ("amx_int8",)),
    ("GGML_AMX_BF16", ("amx_bf16",)),
]


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo", encoding="utf-8") as info:
        for line in info:
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    return set()


def _sdist() -> Path:
    """The sdist from PyPI (pip download: the registry is the one host this may reach), checked."""
    target = HOME / SDIST
    if not target.exists():
        HOME.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
            + ["llama-cpp-python==0.3.36", "-d", str(HOME)],
            check=True,
        )
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        target.unlink()
        raise SystemExit(f"{SDIST} has sha256 {digest}, not the published {SDIST_SHA256}")
    return target


def _source() -> Path:
    source = HOME / "src"
    if not (source / "CMakeLists.txt").exists():
        prefix = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
        with tarfile.open(_sdist()) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for member in members:
                member.name = member.name[len(prefix) :]
            tar.extractall(source, members=[m for m in members if m.name], filter="data")
    return source


def _compile(enabled: list[str]) -> None:
    source, build = _source(), HOME / "build"
    shutil.rmtree(build, ignore_errors=True)
    options = [
        "-DGGML_NATIVE=OFF",
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_BUILD_SERVER=ON",
        "-DCMAKE_BUILD_TYPE=Release",
    ]
    options += [f"-D{name}={'ON' if name in enabled else 'OFF'}" for name, _ in INSTRUCTION_SETS]
    subprocess.run(["cmake", "-S", str(source), "-B", str(build), "-G", "Ninja", *options], check=True)
    jobs = str(os.cpu_count() or 2)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", jobs], check=True)


def _runs(gguf: Path) -> bool:
    """The built server loads the model and answers one completion without crashing."""
    probe = subprocess.run(
        [str(SERVER), "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    if probe.returncode < 0:
        return False
    from serve_load import free_port, start

    port = free_port()
    try:
        process = start(
            [str(SERVER), "-m", str(gguf), "--port", str(port), "-t", "1", "-c", "512"],
            f"http://127.0.0.1:{port}/health",
        )
    except RuntimeError:
        return False
    try:
        import httpx

        body = {"prompt": "Hello", "n_predict": 4}
        return httpx.post(f"http://127.0.0.1:{port}/completion", json=body, timeout=60).status_code == 200
    except httpx.HTTPError:
        return False
    finally:
        process.terminate()


def build(gguf: Path) -> dict:
    """Build (once) with every instruction set the CPU has, turning the newest off while it crashes."""
    if INFO.exists() and SERVER.exists():
        return json.loads(INFO.read_text())
    flags = cpu_flags()
    wanted = [name for name, needs in INSTRUCTION_SETS if all(f in flags for f in needs)]
    enabled, turned_off = list(wanted), []
    while True:
        _compile(enabled)
        if _runs(gguf):
            break
        if not enabled:
            raise SystemExit("llama-server crashes even with no optional instruction set")
        turned_off.append(enabled.pop())
        print(f"llama-server crashed; building again without {turned_off[-1]}", flush=True)
    info = {
        "source": f"llama.cpp vendored by {SDIST} (sha256 {SDIST_SHA256[:12]}…)",
        "enabled": enabled,
        "turned_off_because_it_crashed": turned_off,
        "cpu_lacks": [name for name, _ in INSTRUCTION_SETS if name not in wanted],
    }
    INFO.write_text(json.dumps(info, indent=2) + "\n")
    return info


def server_command(gguf: Path, port: int, *, parallel: int, threads: int, context: int = 8192) -> list[str]:
    """llama-server as a user serving many would start it: continuous batching, `parallel` slots
    sharing the context (each gets context / parallel tokens), one thread per core."""
    return [
        str(SERVER),
        "-m",
        str(gguf),
        "--port",
        str(port),
        "-t",
        str(threads),
        "-np",
        str(parallel),
        "-c",
        str(context * parallel),
        "--cont-batching",
        "--alias",
        "smollm2",
    ]


def main() -> None:
    from tertulia.models import registry

    command = sys.argv[1] if len(sys.argv) > 1 else "build"
    _, gguf = registry.resolve("smollm2-135m")
    if command == "build":
        print(json.dumps(build(gguf), indent=2))
    elif command == "info":
        print(INFO.read_text() if INFO.exists() else "not built yet: python benchmarks/llama_cpp.py build")
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
