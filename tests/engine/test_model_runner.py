"""The model runner's prefill: chunks of several prompts in one forward give each chunk its own numbers."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from tertulia.engine import float32
from tertulia.engine.engine import Engine
from tertulia.engine.sampling import SamplingParams
from tertulia.engine.scheduler import PREFILL_CHUNK
from tertulia.models.registry import LoadedModel

MakeModel = Callable[..., LoadedModel]


def prompt(length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(100, 40000, (length,), generator=generator).tolist()


def first_steps(engine: Engine, prompts: list[list[int]]) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Every logits batch the sampler saw, and each request's greedy tokens."""
    seen: list[torch.Tensor] = []
    sample = engine.sampler.sample

    def record(sequences, logits):
        seen.append(logits.clone())
        return sample(sequences, logits)

    engine.sampler.sample = record  # type: ignore[method-assign]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    sequences = [engine.add(p, params)[0] for p in prompts]
    while engine.has_work:
        engine.step()
    return seen, [s.output for s in sequences]


@pytest.mark.parametrize("mode", ["int4", "none"])
def test_prompts_prefilled_together_get_the_logits_they_get_alone(
    make_tiny_model: MakeModel, mode: str
) -> None:
    """int4 layers with an int8 head, and float32 layers on the engine's float32 kernel."""
    if mode == "none" and not float32.kernel_runs():
        pytest.skip("the engine's float32 kernel needs its C++ library and AVX2 and FMA")
    shared = prompt(40, 0)
    prompts = [
        prompt(3, 1),
        shared + prompt(9, 2),
        shared + prompt(20, 3),  # a prefix-cache hit on blocks the previous prompt fills in the same forward
        prompt(PREFILL_CHUNK + 30, 4),  # two chunks, the first one in that same step
        prompt(17, 5),
    ]
    runs = {}
    for together in (True, False):
        engine = Engine(make_tiny_model(seed=4, max_position_embeddings=1024), quantization=mode, max_batch=8)
        assert engine.runner.rows_independent
        engine.runner.rows_independent = together
        forwards: list[int] = []
        prefill = engine.runner._prefill_together

        def counted(chunks, prefill=prefill, forwards=forwards):
            forwards.append(len(chunks))
            return prefill(chunks)

        engine.runner._prefill_together = counted  # type: ignore[method-assign]
        logits, outputs = first_steps(engine, prompts)
        # Together: the first step's four chunks in one forward; alone: one forward per chunk.
        assert forwards == ([4, 2] if together else [1] * 6)
        runs[together] = (logits, outputs, engine.cache.storage.clone())
    (together_logits, together_out, together_cache), (alone_logits, alone_out, alone_cache) = (
        runs[True],
        runs[False],
    )
    assert together_out == alone_out
    assert len(together_logits) == len(alone_logits)
    assert all(torch.equal(a, b) for a, b in zip(together_logits, alone_logits, strict=True))
    assert torch.equal(together_cache, alone_cache)


@pytest.mark.parametrize("mode", ["none", "int8"])
def test_pytorchs_float_matmuls_prefill_one_chunk_at_a_time(
    make_tiny_model: MakeModel, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    monkeypatch.setattr(float32, "kernel_runs", lambda: False)
    engine = Engine(make_tiny_model(seed=1), quantization=mode, max_batch=2)
    assert not engine.runner.rows_independent
