"""Start-up cost of int4 weights: a cache keyed on the CPU's kernel set, or a portable form packed at load.

    python benchmarks/int4_cache.py [--runs 7]

PyTorch packs int4 weights in a layout that depends on the CPU kernel set, so a cache is either keyed
on it (what Tertulia does: read the packed file, check its fingerprint) or stores a layout-free form
and packs at every load. Each run starts from the embedded model's float32 weights and times, for all
its int4 layers:

- "quantize": from float32, what the first start on a machine costs;
- "keyed cache: read": the packed file read back and installed (Tertulia's cache);
- "keyed cache: fingerprint": the logit check that refuses a layout computed elsewhere;
- "portable: pack from int32": 4-bit values stored one per int32, packed at load;
- "portable: pack from nibbles": two values per byte (the smallest file), unpacked then packed.

This is about PyTorch's int4 kernel, whose layout depends on the kernel set; the engine's own kernel
(CPUs with AVX512-BF16, see engine/quant.py) has one layout everywhere, so it is switched off here.

Writes benchmarks/results/int4_cache.json (medians, every run, file sizes, the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

os.environ["TERTULIA_NATIVE"] = "0"  # PyTorch's kernel and layout (see above); before tertulia loads

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import save_file

from tertulia.engine import quant
from tertulia.models import registry

try:
    from benchmarks.machine import describe
except ImportError:  # run as a script from the benchmarks folder
    from machine import describe  # type: ignore[no-redef]

T = TypeVar("T")
TARGETS = quant.INT4_TARGETS
RESULTS = Path(__file__).parent / "results"


def int4_values(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unpacked 4-bit values (int32, one per weight) of every int4 projection of a float module."""
    return {
        f"layers.{i}.{name}.values": quant.four_bit_values(getattr(layer, name).weight)[0]
        for i, layer in enumerate(module.layers)
        for name in TARGETS
    }


def to_nibbles(values: torch.Tensor) -> torch.Tensor:
    return (values[:, ::2] | (values[:, 1::2] << 4)).to(torch.uint8)


def from_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    wide = nibbles.to(torch.int32)
    return torch.stack([wide & 15, wide >> 4], dim=-1).reshape(wide.shape[0], -1)


def portable_file(path: Path, values: dict[str, torch.Tensor], keyed: Path, nibbles: bool) -> None:
    """The keyed cache's contents with the packed weights replaced by layout-free 4-bit values."""
    _, tensors = quant.read_cache(keyed)
    kept = {k: v for k, v in tensors.items() if not k.endswith(".packed") and not k.startswith("fingerprint")}
    save_file(kept | {k: to_nibbles(v) if nibbles else v for k, v in values.items()}, str(path))


def timed(action: Callable[[], T]) -> tuple[float, T]:
    started = time.perf_counter()
    result = action()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = registry.load()
    module = model.module
    float_layers = [(layer, name, getattr(layer, name)) for layer in module.layers for name in TARGETS]
    float_layers.append((module, "lm_head", module.lm_head))
    values = int4_values(module)
    folder = Path(tempfile.mkdtemp())
    keyed = quant.cache_file(folder, model.weights_key or "model")
    int32_file, nibble_file = folder / "int32.safetensors", folder / "nibbles.safetensors"

    def read_keyed() -> dict[str, torch.Tensor]:
        _, tensors = quant.read_cache(keyed)
        quant._int4_from_tensors(module, tensors)
        return tensors

    def read_portable(path: Path, unpack: Callable[[torch.Tensor], torch.Tensor]) -> None:
        _, tensors = quant.read_cache(path)
        for key in [k for k in tensors if k.endswith(".values")]:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack(tensors.pop(key)), 1)
            tensors[key.removesuffix("values") + "packed"] = packed
        quant._int4_from_tensors(module, tensors)

    names = ["quantize", "keyed cache: read", "keyed cache: fingerprint"]
    names += ["portable: pack from int32", "portable: pack from nibbles"]
    timings: dict[str, list[float]] = {name: [] for name in names}
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns) as progress:
        task = progress.add_task("runs", total=args.runs)
        for run in range(args.runs):
            quant._restore(float_layers)
            seconds, _ = timed(lambda: quant._quantize_int4(module))
            timings["quantize"].append(seconds)
            quant._save_int4(module, keyed)
            if run == 0:
                portable_file(int32_file, values, keyed, nibbles=False)
                portable_file(nibble_file, values, keyed, nibbles=True)
            quant._restore(float_layers)
            seconds, tensors = timed(read_keyed)
            timings["keyed cache: read"].append(seconds)
            seconds, distance = timed(lambda: quant._fingerprint_mismatch(module, tensors))  # noqa: B023
            timings["keyed cache: fingerprint"].append(seconds)
            assert distance <= quant.FINGERPRINT_TOLERANCE, distance
            for name, path, unpack in (
                ("portable: pack from int32", int32_file, lambda q: q),
                ("portable: pack from nibbles", nibble_file, from_nibbles),
            ):
                quant._restore(float_layers)
                timings[name].append(timed(lambda p=path, u=unpack: read_portable(p, u))[0])
                # The packed weights made at load compute what the keyed cache's do.
                assert quant._fingerprint_mismatch(module, tensors) <= quant.FINGERPRINT_TOLERANCE
            progress.advance(task)
    medians = {name: statistics.median(runs) for name, runs in timings.items()}
    keyed_total = medians["keyed cache: read"] + medians["keyed cache: fingerprint"]
    sizes = {
        "keyed": keyed.stat().st_size,
        "int32": int32_file.stat().st_size,
        "nibbles": nibble_file.stat().st_size,
    }
    print(f"\nint4 weights of the embedded model, median of {args.runs} runs")
    for name, seconds in medians.items():
        print(f"{name:<30} {seconds * 1000:8.1f} ms")
    print(f"{'keyed cache, in all':<30} {keyed_total * 1000:8.1f} ms")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "int4_cache.json"
    out.write_text(
        json.dumps(
            {
                "machine": describe(),
                "settings": {"runs": args.runs, "model": model.name},
                "median_seconds": medians,
                "keyed_total_seconds": keyed_total,
                "runs_seconds": timings,
                "file_bytes": sizes,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
