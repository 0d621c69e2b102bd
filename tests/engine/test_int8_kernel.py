"""The engine's own int8 matmul for the LM head (csrc/int8_matmul.cpp): right numbers in float32, a
row's logits independent of the other rows and of threads, and clear errors for bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tertulia.engine import quant
from tests.engine.threads import one_and_many_threads

pytestmark = pytest.mark.skipif(
    not quant.own_kernel(), reason="the engine's int8 kernel needs its C++ library and AVX512-BF16"
)


def head(
    out_features: int, in_features: int, seed: int = 0
) -> tuple[quant.Int8Linear, torch.Tensor, nn.Linear]:
    """An int8 head for the engine's kernel, the float32 weight its int8 values stand for, and the
    float32 layer it came from."""
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=False)
    int8 = quant.Int8Linear.quantize(linear, own=True)
    weight = linear.weight.detach()
    scale = (weight.abs().amax(dim=1) / 127).clamp(min=1e-10)
    exact = (weight / scale[:, None]).round().clamp(-127, 127) * scale[:, None]
    return int8, exact, linear


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return float((y.float() - reference).norm() / reference.norm())


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 16, 17])
@pytest.mark.parametrize(("out_features", "in_features"), [(32, 4), (64, 36), (960, 576), (4096, 64)])
def test_it_computes_x_times_the_weight_in_float32(rows: int, out_features: int, in_features: int) -> None:
    int8, exact, _ = head(out_features, in_features)
    x = torch.randn(rows, in_features)
    y = int8(x)
    assert y.shape == (rows, out_features) and y.dtype == torch.float32
    # The input is rounded to bf16 (as for PyTorch's kernel); the products are exact and the sums
    # float32, so what is left is float32 rounding, far below bf16's 2^-9.
    assert relative_error(y, x.bfloat16().float() @ exact.t()) < 1e-5


def test_it_is_closer_than_pytorchs_kernel() -> None:
    int8, exact, linear = head(2048, 576, seed=1)
    x = torch.randn(8, 576)
    reference = x.bfloat16().float() @ exact.t()
    theirs = quant.Int8Linear.quantize(linear, own=False)(x)
    assert relative_error(int8(x), reference) * 100 < relative_error(theirs, reference)


def test_a_rows_logits_do_not_depend_on_the_other_rows() -> None:
    int8, _, _ = head(1024, 576, seed=2)
    x = torch.randn(21, 576)
    whole = int8(x)
    for start, stop in [(0, 1), (4, 5), (3, 11), (16, 21), (1, 20)]:
        assert torch.equal(int8(x[start:stop]), whole[start:stop])


def test_the_thread_count_does_not_change_the_result() -> None:
    int8, _, _ = head(2048, 576, seed=3)
    x = torch.randn(9, 576)
    alone, shared = one_and_many_threads(lambda: int8(x))
    assert torch.equal(alone, shared)


def test_no_rows_give_an_empty_result() -> None:
    int8, _, _ = head(64, 64)
    assert int8(torch.empty(0, 64)).shape == (0, 64)


def test_shapes_it_does_not_take_keep_pytorchs_kernel_or_are_refused() -> None:
    odd = nn.Linear(64, 48, bias=False)  # 48 outputs: not whole blocks of 32
    assert quant.Int8Linear.quantize(odd).weight_int8.dim() == 2
    with pytest.raises(ValueError, match="blocks of 32"):
        quant.Int8Linear.quantize(odd, own=True)


def test_bad_input_is_refused_with_a_message() -> None:
    int8, _, _ = head(64, 64)
    with pytest.raises(RuntimeError, match="bf16"):
        torch.ops.tertulia.int8_mm(torch.randn(2, 64), int8.weight_int8, int8.scale)
    with pytest.raises(RuntimeError, match="inputs"):
        torch.ops.tertulia.int8_mm(torch.randn(2, 96).bfloat16(), int8.weight_int8, int8.scale)
    with pytest.raises(RuntimeError, match="scale"):
        torch.ops.tertulia.int8_mm(torch.randn(2, 64).bfloat16(), int8.weight_int8, int8.scale.half())
