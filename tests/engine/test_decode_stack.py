"""The C++ decode stack gives the Python decode forward's logits bit for bit, and serves only what it can.

`make` builds the library before the suite runs (python -m tertulia.engine.native), so these tests
run it; TERTULIA_NATIVE=0 is the one way to leave it out, and then they skip saying so.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

from tertulia.engine import attention, decode_stack, native
from tertulia.engine.attention import DecodeAttention
from tertulia.engine.decode_stack import NativeDecode
from tertulia.engine.engine import Engine
from tertulia.engine.model_runner import ModelRunner
from tertulia.engine.sampling import SamplingParams
from tertulia.engine.sequence import Status
from tertulia.models.registry import LoadedModel

MakeModel = Callable[..., LoadedModel]

pytestmark = pytest.mark.skipif(
    os.environ.get("TERTULIA_NATIVE") == "0", reason="TERTULIA_NATIVE=0 leaves the C++ decode stack out"
)


def prompt(length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(100, 40000, (length,), generator=generator).tolist()


def test_the_library_is_built_and_loads() -> None:
    assert native.library() is not None, "run `python -m tertulia.engine.native` (make does)"
    assert native.available()


def decode_steps(engine: Engine, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For `steps` decode steps of the engine's running batch: (the stack's logits, the Python
    forward's), both computed on the same cache before the engine samples from the stack's."""
    python = ModelRunner(engine.model.module, engine.cache, native=False)
    pairs = []
    for _ in range(steps):
        batch = engine.scheduler.decode_batch(list(engine.running))
        assert batch is not None
        # Both forwards write this step's keys and values before attending; the stack's last.
        expected = python.decode(batch)
        got = engine.runner.decode(batch)
        pairs.append((got, expected))
        engine.sampler.sample(batch.sequences, got)
    return pairs


def prefilled(make_tiny_model: MakeModel, bias: bool) -> Engine:
    """Sequences of lengths under 128, 128-256 and alone in their bucket, prefilled, in one batch."""
    engine = Engine(make_tiny_model(seed=3, attention_bias=bias), quantization="int4", max_batch=4)
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for length, seed in ((5, 1), (9, 2), (140, 3), (200, 4)):
        engine.add(prompt(length, seed), greedy)
    while engine.waiting or engine.prefilling:
        engine.step()
    return engine


@pytest.mark.parametrize("paged", [True, False], ids=["in-place", "buckets"])
@pytest.mark.parametrize("bias", [False, True], ids=["llama", "qwen2-bias"])
def test_the_unfused_stack_gives_the_python_forwards_logits_bit_for_bit(
    make_tiny_model: MakeModel, monkeypatch: pytest.MonkeyPatch, bias: bool, paged: bool
) -> None:
    """The stack making the Python forward's own ATen calls: attention read in place from the pool,
    and (where that kernel does not run) gathered into buckets."""
    engine = prefilled(make_tiny_model, bias)
    if not paged:
        monkeypatch.setattr(attention, "paged_attention_runs", lambda cache: False)
    elif not attention.paged_attention_runs(engine.cache):
        pytest.skip("decode attention in place needs AVX2 and FMA")
    engine.runner.native = NativeDecode.of(engine.model.module, engine.cache, fused=False)
    batch = engine.scheduler.decode_batch(list(engine.running))
    assert batch is not None and len({-(-(p + 1) // 128) for p in batch.positions}) >= 2
    assert DecodeAttention(engine.cache, batch.tables, batch.positions).paged is paged
    for got, expected in decode_steps(engine, 6):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("bias", [False, True], ids=["llama", "qwen2-bias"])
def test_the_fused_stack_agrees_with_the_python_forward(make_tiny_model: MakeModel, bias: bool) -> None:
    """The default where the fused ops run: the same function, other roundings (float32 sums in
    another order, one bf16 rounding of SiLU·up instead of two), so close rather than equal."""
    engine = prefilled(make_tiny_model, bias)
    if not decode_stack.fused_ops_run(engine.model.config):
        pytest.skip("the fused decode ops need AVX2 and FMA")
    assert engine.runner.native is not None and engine.runner.native.fused
    pairs = decode_steps(engine, 6)
    # bf16 activations: a last-bit difference in one layer's input moves a logit by a few hundredths
    # of the logits' spread (0.035 here; 0.10 at most on the embedded model over 120 tokens).
    for got, expected in pairs:
        assert (got - expected).abs().max() <= 0.1 * expected.std()
    agree = sum(int((got.argmax(-1) == expected.argmax(-1)).sum()) for got, expected in pairs)
    assert agree >= 0.9 * sum(len(got) for got, _ in pairs)


def test_generation_is_the_same_with_and_without_the_stack(
    make_tiny_model: MakeModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = [prompt(n, n) for n in (4, 11, 30)]
    params = SamplingParams(temperature=0.8, seed=5, max_tokens=24, ignore_eos=True)

    def outputs(engine: Engine) -> list[list[int]]:
        sequences = [engine.add(p, params)[0] for p in prompts]
        while any(s.status is not Status.FINISHED for s in sequences):
            engine.step()
        return [s.output for s in sequences]

    with_stack = Engine(make_tiny_model(seed=8), quantization="int4", max_batch=3)
    without = Engine(make_tiny_model(seed=8), quantization="int4", max_batch=3)
    without.runner.native = None
    # The unfused stack: the fused one computes the same function with other roundings.
    with_stack.runner.native = NativeDecode.of(with_stack.model.module, with_stack.cache, fused=False)
    assert with_stack.runner.native is not None
    assert outputs(with_stack) == outputs(without)


@pytest.mark.parametrize("mode", ["none", "int8"])
def test_models_it_cannot_serve_keep_the_python_forward(make_tiny_model: MakeModel, mode: str) -> None:
    engine = Engine(make_tiny_model(seed=2), quantization=mode, max_batch=2)
    assert engine.runner.native is None


def test_layers_left_in_float32_keep_the_python_forward(make_tiny_model: MakeModel) -> None:
    engine = Engine(make_tiny_model(intermediate_size=100), quantization="int4", max_batch=2)
    assert engine.runner.native is None
