"""Float32 layers on the engine's own matmul (csrc/float32_matmul.cpp), for unquantized models.

PyTorch's float32 GEMM reads the weights of a one-row decode step at about half the memory bandwidth,
and computes a row differently depending on how many rows share the call, so an unquantized model was
neither fast at one stream nor batch-invariant. `pack` swaps a model's linear layers (projections and
LM head) for `Float32Linear`, whose kernel gives each row the same numbers whatever the row count
(so prefill chunks also share one forward, as for int4 models). Where the kernel does not run (no C++
library, no AVX2 and FMA, TERTULIA_MATMUL_KERNELS=pytorch, or an output count not a multiple of 16)
the layers stay PyTorch's. This module knows nothing of quantization or of the KV cache.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import nn

from tertulia.engine import native

BLOCK = 16  # the kernel takes outputs in blocks of this many
TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@cache
def kernel_runs() -> bool:
    return native.own_matmuls() and bool(torch.ops.tertulia.decode_ops_supported())


class Float32Linear(nn.Module):
    """y = x W^T (+ b) in float32, W stored as [out / 16, in, 16] for the engine's kernel."""

    def __init__(self, packed: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("bias", bias)
        self.in_features = packed.shape[1]
        self.out_features = packed.shape[0] * BLOCK

    @classmethod
    def pack(cls, linear: nn.Linear) -> Float32Linear:
        weight = linear.weight.detach().float()
        rows, columns = weight.shape
        packed = weight.view(rows // BLOCK, BLOCK, columns).transpose(1, 2).contiguous()
        bias = None if linear.bias is None else linear.bias.detach().float().contiguous()
        return cls(packed, bias)

    @property
    def weight(self) -> torch.Tensor:
        """The [out, in] weight, rebuilt (for quantizing a model served in float32 before)."""
        return self.packed.transpose(1, 2).reshape(self.out_features, self.in_features)

    def unpack(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.weight = nn.Parameter(self.weight.contiguous(), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias, requires_grad=False)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).float().contiguous()
        y = torch.ops.tertulia.float32_mm(rows, self.packed, self.bias)
        return y.reshape(*shape[:-1], self.out_features)


def _owners(module: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(layer, name) for layer in module.layers for name in TARGETS] + [(module, "lm_head")]


def pack(module: nn.Module) -> bool:
    """Swap every linear layer of `module` for a Float32Linear, all or none; True if it did."""
    owners = _owners(module)
    linears = [getattr(owner, name) for owner, name in owners]
    fits = all(isinstance(x, nn.Linear) and x.out_features % BLOCK == 0 for x in linears)
    on_cpu = all(x.weight.device.type == "cpu" for x in linears)
    if not (kernel_runs() and fits and on_cpu):
        return False
    for (owner, name), linear in zip(owners, linears, strict=True):
        setattr(owner, name, Float32Linear.pack(linear))
    return True


def unpack(module: nn.Module) -> None:
    """Undo `pack` (before quantizing a model that served in float32)."""
    for owner, name in _owners(module):
        layer = getattr(owner, name)
        if isinstance(layer, Float32Linear):
            setattr(owner, name, layer.unpack())


def packed(module: nn.Module) -> bool:
    return all(isinstance(getattr(owner, name), Float32Linear) for owner, name in _owners(module))
