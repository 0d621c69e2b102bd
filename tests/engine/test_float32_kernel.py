"""The engine's float32 matmul (csrc/float32_matmul.cpp, engine/float32.py): right numbers, a row's
result independent of the other rows and of threads, models packed all or nothing, and unpacked again
when quantized later."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from tertulia.engine import float32, quant
from tertulia.engine.engine import Engine
from tertulia.models.registry import LoadedModel
from tests.engine.test_engine import random_prompt, recompute_logits
from tests.engine.threads import one_and_many_threads

MakeModel = Callable[..., LoadedModel]

pytestmark = pytest.mark.skipif(
    not float32.kernel_runs(), reason="the engine's float32 kernel needs its C++ library and AVX2 and FMA"
)


def layer(out_features: int, in_features: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 16, 33])
@pytest.mark.parametrize(
    ("out_features", "in_features", "bias"), [(16, 1, False), (64, 36, True), (960, 576, True)]
)
def test_it_computes_x_times_the_weight(rows: int, out_features: int, in_features: int, bias: bool) -> None:
    linear = layer(out_features, in_features, bias)
    x = torch.randn(rows, in_features)
    with torch.inference_mode():
        y = float32.Float32Linear.pack(linear)(x)
        exact = nn.functional.linear(
            x.double(), linear.weight.double(), None if not bias else linear.bias.double()
        )
    assert y.shape == (rows, out_features) and y.dtype == torch.float32
    torch.testing.assert_close(y, exact.float(), atol=1e-5, rtol=1e-5)


def test_a_rows_result_does_not_depend_on_the_other_rows() -> None:
    packed = float32.Float32Linear.pack(layer(320, 576, seed=2))
    x = torch.randn(37, 576)
    with torch.inference_mode():
        whole = packed(x)
        for start, stop in [(0, 1), (5, 6), (3, 11), (30, 37), (1, 36)]:
            assert torch.equal(packed(x[start:stop]), whole[start:stop])


def test_the_thread_count_does_not_change_the_result() -> None:
    packed = float32.Float32Linear.pack(layer(576, 576, seed=3))
    x = torch.randn(9, 576)
    alone, shared = one_and_many_threads(lambda: packed(x))
    assert torch.equal(alone, shared)


def test_unpacking_gives_the_weights_back() -> None:
    linear = layer(64, 32, seed=4)
    back = float32.Float32Linear.pack(linear).unpack()
    assert torch.equal(back.weight, linear.weight) and torch.equal(back.bias, linear.bias)


def test_an_unquantized_engine_serves_on_it_and_quantizes_from_it_later(make_tiny_model: MakeModel) -> None:
    model = make_tiny_model(seed=6)
    reference = recompute_logits(model, random_prompt(10, seed=1))
    engine = Engine(model, quantization="none", max_batch=2)
    assert float32.packed(model.module) and engine.runner.rows_independent
    torch.testing.assert_close(
        recompute_logits(model, random_prompt(10, seed=1)), reference, atol=1e-4, rtol=0
    )
    # The same module quantized afterwards: from the weights the packed layers hold.
    fresh = make_tiny_model(seed=6)
    quant.apply(fresh.module, "int4")
    quant.apply(model.module, "int4")
    assert not float32.packed(model.module)
    tokens = random_prompt(10, seed=2)
    assert torch.equal(recompute_logits(model, tokens), recompute_logits(fresh, tokens))


def test_a_model_it_cannot_take_whole_stays_on_pytorch(make_tiny_model: MakeModel) -> None:
    model = make_tiny_model(intermediate_size=100)  # gate_up 200 outputs: not blocks of 16
    Engine(model, quantization="none", max_batch=2)
    assert not float32.packed(model.module)
    assert isinstance(model.module.layers[0].qkv_proj, nn.Linear)
