"""Smaller weights for faster decode on CPU (decode reads every weight once per step).

- "int4": weight-only 4-bit, groups of 32 along the input, asymmetric (scale and minimum per group),
  bf16 activations. Two kernels, and the weights are packed for one of them: the engine's own
  (csrc/int4_matmul.cpp) where the C++ library is built and the CPU has AVX512-BF16, PyTorch's packed
  int4 kernel elsewhere. Ours unpacks a group of weights once for all the rows of a call, where
  PyTorch's converts them again for every few rows: a 16-stream decode step is much faster, and one
  stream no slower (BENCHMARKS.md: the step profile and the serving A/B).
  Both compute each row on its own, so a row's numbers do not depend on the others in the call.
  For a Q4_1 GGUF source this reproduces the file's own 4-bit weights: Q4_1 is exactly this format
  (its blocks use the full 0..15 range, so min/max recover the block's scale and minimum), so the
  quantization adds no error of its own.
- "int8": FBGEMM dynamic quantization (int8 weights per channel, activations quantized per call).
- "none": float32, the reference.

In "int4" the LM head (49k rows, as costly as a third of the layers) gets int8 weights with one scale
per row (`Int8Linear`), multiplied by the engine's own kernel where the int4 layers are
(csrc/int8_matmul.cpp: each weight converted once per call, float32 logits out) and by PyTorch's
elsewhere; the embedding it may share stays float32 for lookups. Measured against a
float32 head on held-out chats: int8 agrees on the top token 98.4% of the time (mean KL 0.0017); int4
only 89.7% (KL 0.041), too lossy; float16 is exact (KL 1e-5) and 12% faster for 16 streams, but reads
56 MB from memory per token, which made one stream 17% slower. The quality cost of each mode is
measured in BENCHMARKS.md by held-out perplexity.

The int4 weights are cached on disk after the first packing. PyTorch packs them in a layout that
depends on its version and on the CPU kernel set in use (`torch.backends.cpu.get_cpu_capability()`:
DEFAULT, AVX2, AVX512...), and a kernel reading another set's layout computes noise without any
error. So the cache file is named after all three, and it carries a fingerprint: the top logits of
a fixed prompt, computed when it was packed. A load recomputes them and refuses a file that does not
match (a wrong layout moves them by ~40, another CPU running the right layout by 0.25 at most), then
packs again. Keying the file was chosen over storing a portable form and packing at every load:
for the default model, reading the packed file and checking its fingerprint takes ~40 ms; a portable
file packed at load takes ~110 ms from nibbles (~180 ms from int32 values, a file four times larger),
on every start (`benchmarks/int4_cache.py`; BENCHMARKS.md, "Quantized-weight cache").
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from tertulia.engine import float32, native
from tertulia.engine.attention import PrefillAttention
from tertulia.engine.kv_cache import one_sequence
from tertulia.errors import TertuliaError

log = logging.getLogger(__name__)

MODES = ("none", "int8", "int4")
GROUP_SIZE = 32
# Part of the on-disk cache name of quantized weights: bump when quantization output changes.
# 3: named after torch's version and CPU kernel set, with a logit fingerprint; 4: the LM head packed
# for the engine's own int8 kernel where the int4 weights are for its own int4 kernel.
FORMAT_VERSION = 4
# The fingerprint: the top logits after a fixed sequence of this many tokens. Recomputed on load, they
# may move by FINGERPRINT_TOLERANCE standard deviations of the logits: for the default model (std 3.3)
# another kernel set rounding bf16 differently moves them by 0.25 at most, a foreign layout by ~40.
FINGERPRINT_TOKENS = 8
FINGERPRINT_TOP = 16
FINGERPRINT_TOLERANCE = 0.5


def four_bit_values(
    weight: torch.Tensor, group_size: int = GROUP_SIZE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit groups along the input: values 0..15 (int32, weight's shape), and each group's
    scale and minimum ([rows, groups, 1]); the weight is ~ q * scale + minimum."""
    weight = weight.detach().float()
    out_features, in_features = weight.shape
    groups = weight.reshape(out_features, in_features // group_size, group_size)
    low = groups.amin(dim=-1, keepdim=True)
    high = groups.amax(dim=-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=1e-10)
    q = ((groups - low) / scale).round().clamp(0, 15).to(torch.int32).reshape(out_features, in_features)
    return q, scale, low


OWN_KERNEL = "bf16dot"  # names the engine's own int4 kernel where a kernel set is named


@cache
def own_kernel() -> bool:
    """Whether weights are packed for the engine's own kernels here (int4 layers, int8 head): the
    library's matmuls chosen (native.own_matmuls) on a CPU with AVX512-BF16."""
    return native.own_matmuls() and bool(torch.ops.tertulia.int4_mm_supported())


def int4_kernels() -> str:
    """The kernels int4 weights are packed for here: ours, or PyTorch's for its CPU kernel set."""
    return OWN_KERNEL if own_kernel() else kernel_set()


OWN_BLOCK = 32  # the engine's kernel takes outputs in blocks of this many (two tiles of 16)


def pack_own(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit values q [out, in] (0..15) and each group's scale and zero [out, in / 32, 1] in the layout
    of csrc/int4_matmul.cpp: bytes [out / 32, in / 32, 2, 256], float16 [out / 32, in / 32, 2, 2, 16]."""
    rows, columns = q.shape
    blocks, groups = rows // OWN_BLOCK, columns // GROUP_SIZE
    # [block, group, tile, output, pair, j]: output 16 * tile + output, input 2 * pair + j of the group.
    values = q.to(torch.uint8).view(blocks, 2, 16, groups, 16, 2).permute(0, 3, 1, 2, 4, 5)
    # Pairs 2c and 2c + 1 share chunk c's bytes (low and high nibble); in a chunk, byte 2 * output + j.
    packed = (values[..., 0::2, :] | (values[..., 1::2, :] << 4)).permute(0, 1, 2, 4, 3, 5)
    scales = torch.stack([scale.squeeze(-1), zero.squeeze(-1)])  # [2, out, groups]
    scales = scales.view(2, blocks, 2, 16, groups).permute(1, 4, 2, 0, 3)
    return packed.reshape(blocks, groups, 2, 256).contiguous(), scales.to(torch.float16).contiguous()


class Int4Linear(nn.Module):
    """y = x W^T (+ b), W stored as packed 4-bit groups; computes in bf16, returns x's dtype.

    The layout of `packed` says which kernel it is for: 4-D for the engine's own, 2-D for PyTorch's.
    """

    def __init__(
        self,
        packed: torch.Tensor,
        scales_and_zeros: torch.Tensor,
        bias: torch.Tensor | None,
        out_features: int,
        group_size: int = GROUP_SIZE,
    ) -> None:
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.register_buffer("bias", bias)
        self.group_size = group_size
        self.out_features = out_features

    @classmethod
    def quantize(
        cls, linear: nn.Linear, group_size: int = GROUP_SIZE, *, own: bool | None = None
    ) -> Int4Linear:
        """Pack `linear` for the engine's own kernel (`own`; by default where it runs) or PyTorch's."""
        q, scale, low = four_bit_values(linear.weight, group_size)
        out_features = q.shape[0]
        # Both kernels compute (q - 8) * scale + zero, so zero is the group's value at q = 8.
        zero = low + 8 * scale
        if own is None:
            own = own_kernel() and group_size == GROUP_SIZE and out_features % OWN_BLOCK == 0
        if own:
            if not own_kernel() or group_size != GROUP_SIZE or out_features % OWN_BLOCK:
                raise ValueError(
                    "the engine's int4 kernel is not built here, or it takes groups of "
                    f"{GROUP_SIZE} inputs and blocks of {OWN_BLOCK} outputs"
                )
            packed, scales_and_zeros = pack_own(q, scale, zero)
        else:
            scales_and_zeros = (
                torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
            )
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        bias = None if linear.bias is None else linear.bias.detach().float()
        return cls(packed, scales_and_zeros, bias, out_features, group_size)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed.dim() == 4:
            return torch.ops.tertulia.int4_mm(x, self.packed, self.scales_and_zeros)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, self.packed, self.group_size, self.scales_and_zeros
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Decode calls this 120 times per token: the common case (2-D bf16 input) skips the
        # reshapes and casts, each of which costs a dispatch.
        if x.dim() == 2 and x.dtype == torch.bfloat16 and x.is_contiguous():
            y = self._matmul(x)
            return y if self.bias is None else y + self.bias
        shape = x.shape
        y = self._matmul(x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous()).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


class Int8Linear(nn.Module):
    """Weight-only int8 with a scale per output row (the LM head); bf16 activations, float32 logits
    from the engine's own kernel, x's dtype from PyTorch's.

    The layout of `weight_int8` says which kernel it is for: 4-D for the engine's own, 2-D for PyTorch's.
    """

    def __init__(self, weight_int8: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scale", scale)
        self.out_features = scale.shape[0]

    @classmethod
    def quantize(cls, linear: nn.Linear, *, own: bool | None = None) -> Int8Linear:
        """Pack `linear` for the engine's own kernel (`own`; by default where it runs) or PyTorch's."""
        weight = linear.weight.detach().float()
        out_features, in_features = weight.shape
        scale = (weight.abs().amax(dim=1) / 127).clamp(min=1e-10)
        weight_int8 = (weight / scale.unsqueeze(1)).round().clamp(-127, 127).to(torch.int8)
        fits = out_features % OWN_BLOCK == 0 and in_features % 4 == 0
        if own is None:
            own = own_kernel() and fits
        if own:
            if not own_kernel() or not fits:
                raise ValueError(
                    "the engine's int8 kernel is not built here, or it takes blocks of "
                    f"{OWN_BLOCK} outputs and inputs in multiples of 4"
                )
            return cls(pack_head(weight_int8), scale)
        # PyTorch's kernel takes its scales in bf16.
        return cls(weight_int8, scale.to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        if self.weight_int8.dim() == 4:
            y = torch.ops.tertulia.int8_mm(rows.contiguous(), self.weight_int8, self.scale)
        else:
            y = torch.ops.aten._weight_int8pack_mm(rows, self.weight_int8, self.scale).to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)


def pack_head(weight_int8: torch.Tensor) -> torch.Tensor:
    """int8 [out, in] in the layout of csrc/int8_matmul.cpp: [out / 32, in / 2, 2 tiles, 32 bytes],
    byte 16j + i of a tile holding output i's weight at input 2p + j."""
    rows, columns = weight_int8.shape
    grouped = weight_int8.view(rows // OWN_BLOCK, 2, 16, columns // 2, 2)  # [block, tile, output, pair, j]
    return grouped.permute(0, 3, 1, 4, 2).reshape(rows // OWN_BLOCK, columns // 2, 2, 32).contiguous()


INT4_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def _int4_from_tensors(module: nn.Module, tensors: dict[str, torch.Tensor]) -> list[tuple]:
    """Install int4 layers from saved tensors (the names `module.state_dict()` gives them).

    Returns what was replaced, for `_restore` if the result turns out not to match.
    """
    replaced: list[tuple] = [(module, "lm_head", module.lm_head)]
    for i, layer in enumerate(module.layers):
        if f"layers.{i}.qkv_proj.packed" not in tensors:
            continue  # this layer stayed float32 (see _quantize_int4)
        for name in INT4_TARGETS:
            prefix = f"layers.{i}.{name}."
            linear = getattr(layer, name)
            replaced.append((layer, name, linear))
            setattr(
                layer,
                name,
                Int4Linear(
                    tensors[prefix + "packed"],
                    tensors[prefix + "scales_and_zeros"],
                    tensors.get(prefix + "bias"),
                    linear.out_features,
                ),
            )
        layer.matmul_dtype = torch.bfloat16
    module.lm_head = Int8Linear(tensors["lm_head.weight_int8"], tensors["lm_head.scale"])
    return replaced


def _restore(replaced: list[tuple]) -> None:
    for owner, name, original in replaced:
        setattr(owner, name, original)
        if hasattr(owner, "matmul_dtype"):
            owner.matmul_dtype = torch.float32


def rows_independent(module: nn.Module) -> bool:
    """True when every matmul of the model computes each row on its own: all projections int4 and the
    head int8, or all of them on the engine's float32 kernel. Their kernels give a row the same
    numbers whatever the row count (PyTorch's float32 GEMM takes other paths for a few rows, and
    rounds differently)."""
    return bool(getattr(module, "layers", None)) and (float32.packed(module) or fully_int4(module))


def fully_int4(module: nn.Module) -> bool:
    """Every projection int4 and the head int8: what the C++ decode stack serves."""
    layers = list(getattr(module, "layers", []))
    return (
        bool(layers)
        and all(isinstance(getattr(layer, name), Int4Linear) for layer in layers for name in INT4_TARGETS)
        and isinstance(getattr(module, "lm_head", None), Int8Linear)
    )


def _int4_compatible(linear: nn.Linear) -> bool:
    """The packed kernel needs whole groups along the input and outputs in multiples of 16."""
    return linear.in_features % GROUP_SIZE == 0 and linear.out_features % 16 == 0


def _quantize_int4(module: nn.Module) -> None:
    # A layer is converted whole or not at all: its matmul dtype switches to bf16 for every projection.
    for layer in module.layers:
        linears = [getattr(layer, name) for name in INT4_TARGETS]
        if all(_int4_compatible(linear) for linear in linears):
            for name, linear in zip(INT4_TARGETS, linears, strict=True):
                setattr(layer, name, Int4Linear.quantize(linear))
            layer.matmul_dtype = torch.bfloat16
    module.lm_head = Int8Linear.quantize(module.lm_head)


def _quantized_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    keep = (".packed", ".scales_and_zeros", "lm_head.weight_int8", "lm_head.scale")
    state = module.state_dict()
    tensors = {k: v for k, v in state.items() if k.endswith(keep)}
    for key in list(tensors):
        if key.endswith(".packed") and key[: -len("packed")] + "bias" in state:
            bias_key = key[: -len("packed")] + "bias"
            tensors[bias_key] = state[bias_key]
    return {k: v.contiguous() for k, v in tensors.items()}


def kernel_set() -> str:
    """The CPU kernels torch dispatches to here (honours ATEN_CPU_CAPABILITY)."""
    return torch.backends.cpu.get_cpu_capability().lower()


def _layout() -> dict[str, str]:
    """Everything the packed int4 layout depends on."""
    return {"format": str(FORMAT_VERSION), "torch": torch.__version__, "kernels": int4_kernels()}


def _layout_tag() -> str:
    """The part of a cache file's name that says which layout it holds, but for the kernel set."""
    layout = _layout()
    return f"-int4-v{layout['format']}-torch{layout['torch'].replace('+', '_')}-"


def cache_file(directory: Path, weights_key: str) -> Path:
    """Where the int4 weights of `weights_key` packed for this torch and these kernels are cached."""
    return directory / f"{weights_key}{_layout_tag()}{int4_kernels()}.safetensors"


def _fingerprint_logits(module: nn.Module) -> torch.Tensor:
    """Logits [vocab] after a fixed token sequence (spread over the vocabulary, not a real text)."""
    config = module.config
    vocab = config.vocab_size
    ids = torch.tensor([(i * 7919 + 13) % vocab for i in range(FINGERPRINT_TOKENS)])
    cache, table = one_sequence(config, FINGERPRINT_TOKENS)
    hidden = module(
        ids, torch.arange(FINGERPRINT_TOKENS), PrefillAttention(cache, table, 0, FINGERPRINT_TOKENS)
    )
    return module.compute_logits(hidden[-1:])[0].float()


def _fingerprint(module: nn.Module) -> dict[str, torch.Tensor]:
    logits = _fingerprint_logits(module)
    top = logits.topk(min(FINGERPRINT_TOP, logits.numel()))
    return {
        "fingerprint.indices": top.indices.contiguous(),
        "fingerprint.logits": top.values.contiguous(),
        "fingerprint.std": logits.std().reshape(1),
    }


def _fingerprint_mismatch(module: nn.Module, tensors: dict[str, torch.Tensor]) -> float:
    """How far this module's logits are from those recorded at packing time: the largest difference,
    in standard deviations of the recorded logits."""
    logits = _fingerprint_logits(module)
    recorded = tensors["fingerprint.logits"]
    scale = float(tensors["fingerprint.std"].clamp(min=1e-6))
    return float((logits[tensors["fingerprint.indices"]] - recorded).abs().max()) / scale


def read_cache(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """A cache file's metadata and tensors, each in memory of its own."""
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata() or {}
        # Clone: tensors read from safetensors may sit at any byte offset, and the packed
        # int8/int4 kernels use aligned vector loads (they crash on unaligned weights).
        tensors = {key: handle.get_tensor(key).clone() for key in handle.keys()}  # noqa: SIM118
    return metadata, tensors


def _load_int4(module: nn.Module, path: Path) -> str | None:
    """Install the cached int4 weights; None if they were used, else why they were refused."""
    try:
        metadata, tensors = read_cache(path)
    except (SafetensorError, OSError) as exc:
        return f"unreadable: {exc}"
    layout = _layout()
    foreign = {k: metadata.get(k) for k in layout if metadata.get(k) != layout[k]}
    if foreign:
        return "packed for " + ", ".join(f"{k} {v or '?'}" for k, v in foreign.items())
    try:
        replaced = _int4_from_tensors(module, tensors)
    except (KeyError, RuntimeError) as exc:
        return f"incomplete: {exc}"
    try:
        distance = _fingerprint_mismatch(module, tensors)
    except (KeyError, RuntimeError, IndexError) as exc:
        distance, reason = float("inf"), f"no usable fingerprint: {exc}"
    else:
        reason = f"its test logits moved by {distance:.1f} standard deviations"
    if distance <= FINGERPRINT_TOLERANCE:
        return None
    _restore(replaced)
    return reason


def _save_int4(module: nn.Module, path: Path) -> None:
    """Write the packed weights and their fingerprint atomically (a killed write leaves no file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    save_file({**_quantized_tensors(module), **_fingerprint(module)}, str(partial), metadata=_layout())
    partial.replace(path)
    _prune_other_versions(path)


def _prune_other_versions(kept: Path) -> None:
    """Remove this model's caches from older formats or torch versions (they are never read again).

    Caches for other CPU kernel sets stay: a shared TERTULIA_HOME may serve several machines.
    """
    tag = _layout_tag()
    if tag not in kept.name:
        return  # not named by cache_file: nothing to tell its versions apart by
    weights_key = kept.name[: kept.name.rindex(tag)]
    for candidate in kept.parent.glob(f"{weights_key}-int4-*.safetensors"):
        if not candidate.name.startswith(weights_key + tag):
            candidate.unlink(missing_ok=True)


def check_mode(mode: str, *, allow_auto: bool = False) -> None:
    """Refuse unknown modes with a one-line error ('auto' is resolved by the registry)."""
    allowed = ("auto", *MODES) if allow_auto else MODES
    if mode not in allowed:
        raise TertuliaError(f"Unknown quantization '{mode}'; choose one of {', '.join(allowed)}.")


def apply(
    module: nn.Module,
    mode: str,
    cache_path: Path | None = None,
    load_weights: Callable[[], None] = lambda: None,
) -> str:
    """Quantize `module` in place for serving; return the mode applied.

    With `cache_path` (see `cache_file`), int4 weights are saved after the first quantization and
    read back on later loads, once their fingerprint shows they compute what they computed when packed.
    `load_weights` loads float weights the module was loaded without (registry.load's
    `defer_projections`): called whenever they are needed, which is not when the cache serves.
    """
    check_mode(mode)
    current = getattr(module, "quantization", "none")
    if current != "none" or mode == "none":
        # "none" asks for no (further) quantization: report what the weights already are.
        if mode not in ("none", current):
            raise TertuliaError(f"This model was already quantized to {current}; load it again for {mode}.")
        load_weights()
        if current == "none":
            float32.pack(module)
        return current
    float32.unpack(module)
    module.quantization = mode
    if mode == "int4":
        if cache_path is not None and cache_path.exists():
            refused = _load_int4(module, cache_path)
            if refused is None:
                return mode
            log.warning("Packing the int4 weights again: %s does not match (%s).", cache_path.name, refused)
            cache_path.unlink(missing_ok=True)
        load_weights()
        _quantize_int4(module)
        if cache_path is not None:
            _save_int4(module, cache_path)
        return mode
    load_weights()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        quantize_dynamic(module.layers, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return mode
