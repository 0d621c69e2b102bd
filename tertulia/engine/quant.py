"""Smaller weights for faster decode on CPU (decode reads every weight once per step).

- "int4": weight-only 4-bit, groups of 32 along the input, asymmetric (scale and minimum per group),
  with PyTorch's packed int4 CPU kernel and bf16 activations. For a Q4_1 GGUF source this reproduces
  the file's own 4-bit weights: Q4_1 is exactly this format (its blocks use the full 0..15 range, so
  min/max recover the block's scale and minimum), so the quantization adds no error of its own.
- "int8": FBGEMM dynamic quantization (int8 weights per channel, activations quantized per call).
- "none": float32, the reference.

In "int4" the LM head (49k rows, as costly as a third of the layers) gets int8 weights with one scale
per row (`Int8Linear`); the embedding it may share stays float32 for lookups. The quality cost of each
mode is measured in BENCHMARKS.md by held-out perplexity.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from tertulia.errors import TertuliaError

MODES = ("none", "int8", "int4")
GROUP_SIZE = 32


class Int4Linear(nn.Module):
    """y = x W^T (+ b), W stored as packed 4-bit groups; computes in bf16, returns x's dtype."""

    def __init__(self, linear: nn.Linear, group_size: int = GROUP_SIZE) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        out_features, in_features = weight.shape
        groups = weight.reshape(out_features, in_features // group_size, group_size)
        low = groups.amin(dim=-1, keepdim=True)
        high = groups.amax(dim=-1, keepdim=True)
        scale = ((high - low) / 15).clamp(min=1e-10)
        q = ((groups - low) / scale).round().clamp(0, 15).to(torch.int32).reshape(out_features, in_features)
        # The kernel computes (q - 8) * scale + zero, so zero is the group's value at q = 8.
        zero = low + 8 * scale
        scales_and_zeros = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.bias = (
            None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        )
        self.group_size = group_size
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, shape[-1]).to(torch.bfloat16), self.packed, self.group_size, self.scales_and_zeros
        ).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


class Int8Linear(nn.Module):
    """Weight-only int8 with a scale per output row; bf16 activations, returns x's dtype."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = (weight.abs().amax(dim=1) / 127).clamp(min=1e-10)
        self.register_buffer(
            "weight_int8", (weight / scale.unsqueeze(1)).round().clamp(-127, 127).to(torch.int8)
        )
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.out_features = weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(
            x.reshape(-1, shape[-1]).to(torch.bfloat16), self.weight_int8, self.scale
        ).to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)


def apply(module: nn.Module, mode: str) -> str:
    """Quantize the decoder layers' linear layers of `module` in place; return the mode applied."""
    if mode not in MODES:
        raise TertuliaError(f"Unknown quantization '{mode}'; choose one of {', '.join(MODES)}.")
    if mode == "none":
        return mode
    layers = module.layers
    if mode == "int4":
        for layer in layers:
            for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
                linear = getattr(layer, name)
                if linear.in_features % GROUP_SIZE:
                    continue
                setattr(layer, name, Int4Linear(linear))
            layer.matmul_dtype = torch.bfloat16
        module.lm_head = Int8Linear(module.lm_head)
        return mode
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        quantize_dynamic(layers, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return mode
