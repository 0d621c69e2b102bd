"""The machine a benchmark ran on, recorded in every result file: figures are only comparable on one."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess

_FLAGS_OF_NOTE = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "avx_vnni")


def cpu() -> dict[str, object]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "cores": os.cpu_count(), "flags": [f for f in _FLAGS_OF_NOTE if f in flags]}


def describe() -> dict[str, object]:
    import torch

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "tertulia"], capture_output=True, text=True
            ).stdout
        )
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", False
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu(),
        "torch": torch.__version__,
        "torch_kernels": torch.backends.cpu.get_cpu_capability(),
        "commit": commit + ("+changes" if dirty else ""),
    }
