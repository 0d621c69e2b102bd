"""The engine's C++ library: built once per installation, loaded when present. It holds

- the decode stack (csrc/decode_stack.cpp). A decode step made about 40 op calls per layer; from
  Python each cost a few microseconds of interpreter and argument parsing, which at one stream was a
  third of a token's time. The C++ stack runs a step's layers in one call: by default with the small
  ops fused (csrc/decode_ops.cpp), else with the Python path's own ATen calls, bit for bit
  (tests/engine/test_decode_stack.py);
- an int4 matmul for CPUs with AVX512-BF16 (csrc/int4_matmul.cpp), faster than PyTorch's own from a
  few rows up, and an int8 one for the LM head (csrc/int8_matmul.cpp); quant.py packs weights for
  them where they run;
- decode attention read straight from the paged KV pool (csrc/decode_attention.cpp), for CPUs with
  AVX2 and FMA; attention.py uses it where it runs, in Python and in the decode stack alike;
- the small operations between a decode layer's matmuls, fused (csrc/decode_ops.cpp, AVX2 and FMA),
  which the decode stack uses where they run;
- a float32 matmul for the layers of unquantized models (csrc/float32_matmul.cpp, AVX2 and FMA).

Built by `python -m tertulia.engine.native` (the Makefile's install step runs it), with torch's own
extension builder, into a folder keyed by the sources, torch's version and Python's: a new torch or an
edited source builds anew, never loads a stale library. At run time nothing is compiled: without a
built library, or with TERTULIA_NATIVE=0, the engine runs the Python path with PyTorch's kernels and
says so once in the log. This module does not know what a sequence or a bucket is; decode_stack.py does.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
from functools import cache
from pathlib import Path

import torch

from tertulia import config as settings
from tertulia.errors import TertuliaError

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = (
    CSRC / "decode_stack.cpp",
    CSRC / "int4_matmul.cpp",
    CSRC / "int8_matmul.cpp",
    CSRC / "decode_attention.cpp",
    CSRC / "decode_ops.cpp",
    CSRC / "float32_matmul.cpp",
)
HEADERS = (CSRC / "avx2_math.h", CSRC / "block_runs.h")
NAME = "tertulia_decode_stack"
# -fopenmp: at::parallel_for is a header template whose threads come from `#pragma omp parallel`;
# compiled without it, the kernels run on one thread. The library then uses the OpenMP runtime torch
# has already loaded (same soname), so both share one thread team.
CFLAGS = ("-O3", "-fopenmp")
LDFLAGS = ("-fopenmp",)


def _key() -> str:
    digest = hashlib.sha256(b"".join(source.read_bytes() for source in (*SOURCES, *HEADERS)))
    digest.update(
        f"{torch.__version__}|{sys.version_info[:2]}|{platform.machine()}|{CFLAGS}|{LDFLAGS}".encode()
    )
    return digest.hexdigest()[:16]


def _folders() -> list[Path]:
    """Where a build may live: beside the source (an editable or venv install), else the data folder."""
    key = _key()
    return [CSRC / "build" / key, settings.cache_dir() / "native" / key]


def library() -> Path | None:
    for folder in _folders():
        candidate = folder / f"{NAME}.so"
        if candidate.is_file():
            return candidate
    return None


def build(verbose: bool = False) -> Path:
    """Compile the library (about 20 s on two cores) unless it is already there."""
    built = library()
    if built is not None:
        return built
    from torch.utils import cpp_extension

    # The ninja that `pip install ninja` puts beside this Python, when the shell's PATH lacks it.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    last_error: Exception | None = None
    for folder in _folders():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            cpp_extension.load(
                name=NAME,
                sources=[str(source) for source in SOURCES],
                build_directory=str(folder),
                extra_cflags=list(CFLAGS),
                extra_ldflags=list(LDFLAGS),
                is_python_module=False,
                verbose=verbose,
            )
            return folder / f"{NAME}.so"
        except (OSError, RuntimeError) as exc:  # an unwritable folder, no compiler, no ninja
            last_error = exc
    raise RuntimeError(f"could not build the C++ decode stack: {last_error}")


KERNEL_CHOICES = ("auto", "pytorch")


@cache
def own_matmuls() -> bool:
    """Whether the library's matmuls (int4, int8, float32) may replace PyTorch's where they run.

    TERTULIA_MATMUL_KERNELS=pytorch keeps PyTorch's: a way back should a machine run ours worse
    (BENCHMARKS.md has the figures for the machine it names).
    """
    choice = os.environ.get("TERTULIA_MATMUL_KERNELS", "auto")
    if choice not in KERNEL_CHOICES:
        allowed = ", ".join(KERNEL_CHOICES)
        raise TertuliaError(f"TERTULIA_MATMUL_KERNELS must be one of {allowed}, not '{choice}'.")
    return choice == "auto" and available()


@cache
def available() -> bool:
    """Load the library once per process; False (with one log line) when it cannot be used."""
    if os.environ.get("TERTULIA_NATIVE", "1") == "0":
        return False
    if _registered():  # built by `build` in this very process
        return True
    path = library()
    if path is None:
        log.info("no C++ decode stack built for this torch (python -m tertulia.engine.native): Python path")
        return False
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as exc:
        log.warning("the C++ decode stack at %s does not load (%s): Python path", path, exc)
        return False
    return True


def _registered() -> bool:
    try:
        torch.classes.tertulia.DecodeStack  # noqa: B018 - the lookup is the check
    except RuntimeError:
        return False
    return True


if __name__ == "__main__":
    print(build(verbose="-v" in sys.argv))
