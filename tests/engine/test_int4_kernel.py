"""The engine's own int4 matmul (csrc/int4_matmul.cpp): right numbers, a row's result independent of
the other rows and of threads, every tail of rows and tiles, and clear errors for bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from tertulia.engine import quant
from tests.engine.threads import one_and_many_threads

pytestmark = pytest.mark.skipif(
    not quant.own_kernel(), reason="the engine's int4 kernel needs its C++ library and AVX512-BF16"
)


def layer(out_features: int, in_features: int, seed: int = 0) -> tuple[quant.Int4Linear, torch.Tensor]:
    """An int4 layer for the engine's kernel and the float32 weight its 4-bit values stand for."""
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=False)
    q, scale, low = quant.four_bit_values(linear.weight)
    zero = low + 8 * scale
    # The kernel reads scales and zeros as float16: the weight it stands for uses those values.
    scale16, zero16 = scale.half().float(), zero.half().float()
    groups = in_features // quant.GROUP_SIZE
    weight = ((q.float().view(out_features, groups, -1) - 8) * scale16 + zero16).view(out_features, -1)
    return quant.Int4Linear.quantize(linear, own=True), weight


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return float((y.float() - reference).norm() / reference.norm())


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 16, 37, 130])
@pytest.mark.parametrize(("out_features", "in_features"), [(64, 32), (192, 96), (960, 576), (576, 1536)])
def test_it_computes_x_times_the_weight(rows: int, out_features: int, in_features: int) -> None:
    int4, weight = layer(out_features, in_features)
    x = torch.randn(rows, in_features).bfloat16()
    y = int4(x)
    assert y.shape == (rows, out_features) and y.dtype == torch.bfloat16
    # Exact products and float32 sums: what is left is the bf16 rounding of the output (2^-9).
    assert relative_error(y, x.float() @ weight.t()) < 3e-3


def test_it_is_at_least_as_close_as_pytorchs_kernel() -> None:
    torch.manual_seed(1)
    linear = nn.Linear(576, 960, bias=False)
    q, scale, low = quant.four_bit_values(linear.weight)
    exact = (q.float().view(960, 18, 32) * scale + low).view(960, 576)
    x = torch.randn(24, 576).bfloat16()
    reference = x.float() @ exact.t()
    ours = quant.Int4Linear.quantize(linear, own=True)(x)
    theirs = quant.Int4Linear.quantize(linear, own=False)(x)
    assert relative_error(ours, reference) <= relative_error(theirs, reference)


def test_a_rows_result_does_not_depend_on_the_other_rows() -> None:
    """Alone, in a batch of any size, at any place in it: the same bits (the engine's batch invariance
    rests on it)."""
    int4, _ = layer(320, 576, seed=2)
    x = torch.randn(130, 576).bfloat16()
    whole = int4(x)
    for start, stop in [(0, 1), (5, 6), (3, 11), (64, 130), (1, 129)]:
        assert torch.equal(int4(x[start:stop].contiguous()), whole[start:stop])


def test_the_thread_count_does_not_change_the_result() -> None:
    int4, _ = layer(576, 576, seed=3)
    x = torch.randn(17, 576).bfloat16()
    alone, shared = one_and_many_threads(lambda: int4(x))
    assert torch.equal(alone, shared)


def test_no_rows_give_an_empty_result() -> None:
    int4, _ = layer(64, 64)
    assert int4(torch.empty(0, 64).bfloat16()).shape == (0, 64)


def test_bad_input_is_refused_with_a_message() -> None:
    int4, _ = layer(64, 64)
    with pytest.raises(RuntimeError, match="bf16"):
        torch.ops.tertulia.int4_mm(torch.randn(2, 64), int4.packed, int4.scales_and_zeros)
    with pytest.raises(RuntimeError, match="inputs"):
        torch.ops.tertulia.int4_mm(torch.randn(2, 96).bfloat16(), int4.packed, int4.scales_and_zeros)
    with pytest.raises(RuntimeError, match="scales"):
        torch.ops.tertulia.int4_mm(torch.randn(2, 64).bfloat16(), int4.packed, int4.scales_and_zeros.float())


def test_the_environment_can_keep_pytorchs_kernel() -> None:
    """TERTULIA_MATMUL_KERNELS=pytorch packs for PyTorch's kernel even here; a wrong value is named."""
    code = "from tertulia.engine import quant; print(quant.int4_kernels())"
    for value, expected in (("pytorch", quant.kernel_set()), ("auto", quant.OWN_KERNEL)):
        env = {**os.environ, "TERTULIA_MATMUL_KERNELS": value}
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
        )
        assert out.stdout.strip() == expected
    env = {**os.environ, "TERTULIA_MATMUL_KERNELS": "fast"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode != 0 and "TERTULIA_MATMUL_KERNELS must be one of auto, pytorch" in out.stderr
