"""A failure in one request fails that request alone: the engine, its thread and the batch go on."""

from __future__ import annotations

import asyncio

import pytest

from tertulia.engine.async_engine import AsyncEngine, RequestStream
from tertulia.engine.engine import Engine
from tertulia.engine.sampling import SamplingParams
from tertulia.engine.sequence import SequenceFailed
from tertulia.errors import PromptError
from tests.engine.test_engine import MakeModel, generate, random_prompt, run


def sampled(max_tokens: int = 12, seed: int = 1) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens, ignore_eos=True)


def solo_outputs(make_tiny_model: MakeModel, prompts: list[list[int]]) -> list[list[int]]:
    engine = Engine(make_tiny_model(), max_batch=8)
    return [generate(engine, p, sampled(seed=i))[0].output for i, p in enumerate(prompts)]


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(seed=1.5), "seed must be an integer"),
        (dict(seed=True), "seed must be an integer"),
        (dict(temperature="hot"), "temperature must be a number"),
        (dict(max_tokens="many"), "max_tokens must be an integer"),
        (dict(stop="x"), "stop must be a list"),
        (dict(logit_bias={"5": 1.0}), "logit_bias must map"),
    ],
)
def test_the_engine_refuses_what_would_break_a_step(make_tiny_model: MakeModel, bad, message) -> None:
    engine = Engine(make_tiny_model())
    with pytest.raises(PromptError, match=message):
        engine.add(random_prompt(4), SamplingParams(**bad))
    assert not engine.has_work


def test_a_huge_top_k_keeps_every_token(make_tiny_model: MakeModel) -> None:
    engine = Engine(make_tiny_model())
    huge = generate(
        engine, random_prompt(4), SamplingParams(temperature=1.0, seed=3, top_k=2**63, max_tokens=8)
    )
    plain = generate(engine, random_prompt(4), SamplingParams(temperature=1.0, seed=3, max_tokens=8))
    assert huge[0].output == plain[0].output


def test_a_sequence_whose_draw_fails_fails_alone(make_tiny_model: MakeModel) -> None:
    prompts = [random_prompt(5, seed=i) for i in range(3)]
    expected = solo_outputs(make_tiny_model, prompts)
    engine = Engine(make_tiny_model(), max_batch=8)
    groups = [engine.add(p, sampled(seed=i)) for i, p in enumerate(prompts)]
    engine.step()  # all three prefilled and sampling
    groups[1][0].params.logit_bias = {10**9: 1.0}  # slipped past validation: indexing fails in the draw
    run(engine)
    broken = groups[1][0]
    assert broken.finish_reason == "error" and isinstance(broken.error, SequenceFailed)
    assert [groups[0][0].output, groups[2][0].output] == [expected[0], expected[2]]
    assert engine.idle


def test_a_draw_that_fails_late_replays_the_others_seeds(
    make_tiny_model: MakeModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch drew (every seeded generator advanced), then failed because of one row: the retry
    row by row starts the others' generators where they were, so their tokens are their solo ones."""
    from tertulia.engine import sampler as sampler_module

    prompts = [random_prompt(5, seed=i) for i in range(3)]
    expected = solo_outputs(make_tiny_model, prompts)
    engine = Engine(make_tiny_model(), max_batch=8)
    groups = [engine.add(p, sampled(seed=i)) for i, p in enumerate(prompts)]
    bad = groups[1][0].params
    real_sample = sampler_module.sample

    def fails_after_drawing(logits, params, *rest):  # type: ignore[no-untyped-def]
        tokens = real_sample(logits, params, *rest)
        if any(p is bad for p in params) and len(groups[1][0].output) >= 2:
            raise RuntimeError("failed after the draw")
        return tokens

    monkeypatch.setattr(sampler_module, "sample", fails_after_drawing)
    run(engine)
    assert groups[1][0].finish_reason == "error"
    assert [groups[0][0].output, groups[2][0].output] == [expected[0], expected[2]]


def test_a_sequence_whose_constraint_fails_fails_alone(make_tiny_model: MakeModel) -> None:
    prompts = [random_prompt(5, seed=i) for i in range(2)]
    expected = solo_outputs(make_tiny_model, prompts)
    engine = Engine(make_tiny_model(), max_batch=8)
    good = engine.add(prompts[0], sampled(seed=0))
    [json_seq] = engine.add(prompts[1], SamplingParams(max_tokens=12, json_object=True))
    engine.step()

    def broken_mask(left: int) -> None:
        raise RuntimeError("mask failed")

    json_seq.constraint.mask = broken_mask  # type: ignore[union-attr, method-assign]
    run(engine)
    assert json_seq.finish_reason == "error" and "mask failed" in str(json_seq.error)
    assert good[0].output == expected[0]
    assert engine.idle


def test_generate_raises_the_failure(make_tiny_model: MakeModel) -> None:
    engine = Engine(make_tiny_model())
    params = sampled()
    outputs = engine.generate(random_prompt(4), params)
    next(outputs)
    params.logit_bias = {10**9: 1.0}
    with pytest.raises(SequenceFailed):
        list(outputs)
    assert engine.idle


async def collect(stream: RequestStream, break_after_first: bool = False) -> list[int] | Exception:
    """The stream's tokens, or the exception it ended with. `break_after_first`: after the first token,
    give the request a logit bias that slipped past validation, so its next draw fails mid-batch."""
    tokens: list[int] = []
    try:
        async for out in stream:
            if out.token is not None:
                tokens.append(out.token)
                if break_after_first:
                    stream.params.logit_bias = {10**9: 1.0}
    except Exception as exc:  # noqa: BLE001 - the failure is what the test looks at
        return exc
    return tokens


def test_the_engine_thread_survives_a_request_that_fails(make_tiny_model: MakeModel) -> None:
    """A request the engine refuses in its own thread, and one that fails mid-batch, fail alone; the
    thread keeps serving the others, which get the tokens they get when run alone."""
    prompts = [random_prompt(5, seed=i) for i in range(3)]
    expected = solo_outputs(make_tiny_model, prompts)
    runner = AsyncEngine(Engine(make_tiny_model(), max_batch=8))
    runner.start()

    async def scenario() -> list[list[int] | Exception]:
        with pytest.raises(PromptError):  # refused in the caller, before reaching the thread
            runner.submit(prompts[0], SamplingParams(seed=1.5))
        streams = [runner.submit(p, sampled(seed=i)) for i, p in enumerate(prompts)]
        refused = runner.submit(prompts[0], sampled())
        refused.params.seed = 1.5  # changed after the check: the engine thread's own add fails
        return await asyncio.gather(
            collect(streams[0]),
            collect(streams[1], break_after_first=True),
            collect(streams[2]),
            collect(refused),
        )

    try:
        results = asyncio.run(scenario())
    finally:
        runner.stop()
    assert results[0] == expected[0] and results[2] == expected[2]
    assert isinstance(results[1], SequenceFailed)
    assert isinstance(results[3], PromptError)
    assert runner.engine.idle
