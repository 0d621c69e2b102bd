"""The engine on tiny random models: batching, seeds, stopping, KV blocks, errors.

The reference for "correct" is a from-scratch forward pass: the whole token sequence in one prefill on a
fresh cache, whose logits at every position must match what the engine computed step by step.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from tertulia.engine.attention import PrefillAttention
from tertulia.engine.blocks import BLOCK_SIZE
from tertulia.engine.detokenize import IncrementalDetokenizer
from tertulia.engine.engine import Engine
from tertulia.engine.kv_cache import KVCache, bytes_per_position
from tertulia.engine.sampling import SamplingParams
from tertulia.engine.sequence import Sequence, Status, StepOutput
from tertulia.errors import PromptError, TertuliaError
from tertulia.models.registry import LoadedModel
from tests.answers import PARIS_QUESTIONS, assert_mostly

MakeModel = Callable[..., LoadedModel]

FIRST_PLAIN_ID = 17  # ids 0..16 are special tokens in the SmolLM2 vocabulary


def random_prompt(length: int, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_PLAIN_ID, 49152, (length,), generator=generator).tolist()


def greedy(max_tokens: int, **extra: object) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **extra)  # type: ignore[arg-type]


def run(engine: Engine) -> list[StepOutput]:
    outputs: list[StepOutput] = []
    while engine.has_work:
        outputs += engine.step()
    return outputs


def generate(engine: Engine, prompt: list[int], params: SamplingParams) -> list[Sequence]:
    sequences = engine.add(prompt, params)
    run(engine)
    return sequences


def detokenize(model: LoadedModel, tokens: list[int]) -> str:
    detokenizer = IncrementalDetokenizer(model.tokenizer.token_bytes)
    return "".join(detokenizer.add(t) for t in tokens) + detokenizer.flush()


def recompute_logits(model: LoadedModel, tokens: list[int]) -> torch.Tensor:
    """Logits [len(tokens), V] from one prefill of the whole sequence on a fresh cache."""
    cache = KVCache(model.config, num_blocks=-(-len(tokens) // BLOCK_SIZE))
    table = list(range(cache.allocator.num_blocks))
    hidden = model.module(
        torch.tensor(tokens), torch.arange(len(tokens)), PrefillAttention(cache, table, 0, len(tokens))
    )
    return model.module.compute_logits(hidden)


def record_logits(model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Every logits tensor the engine computes, in order (a spy on compute_logits; behaviour unchanged)."""
    calls: list[torch.Tensor] = []
    original = model.module.compute_logits

    def spy(hidden: torch.Tensor) -> torch.Tensor:
        logits = original(hidden)
        calls.append(logits.clone())
        return logits

    monkeypatch.setattr(model.module, "compute_logits", spy)
    return calls


# --- batching -------------------------------------------------------------------------------------


def test_batched_decode_equals_solo_decode(make_tiny_model: MakeModel) -> None:
    model = make_tiny_model()
    prompts = [random_prompt(n, seed=n) for n in (3, 8, 13, 21)]
    budgets = [4, 12, 12, 10]
    solo = [
        generate(Engine(model, max_batch=4), p, greedy(m))[0].output
        for p, m in zip(prompts, budgets, strict=True)
    ]

    engine = Engine(model, max_batch=4)
    first = [engine.add(p, greedy(m))[0] for p, m in zip(prompts[:3], budgets[:3], strict=True)]
    while first[0].status is not Status.FINISHED:
        engine.step()
    # The first request has freed its block: the late one takes it and another one further on, so
    # its blocks are scattered (a gathered, masked decode) while the others are read in place.
    late = engine.add(prompts[3], greedy(budgets[3]))[0]
    engine.step()
    assert late.blocks[0] == 0  # the first request's block
    assert late.blocks[1] != 1 and all(s.blocks and s.blocks[0] != 0 for s in first[1:])
    run(engine)
    assert late.blocks == [] and engine.idle
    batched = [s.output for s in [*first, late]]
    for got, want, budget in zip(batched, solo, budgets, strict=True):
        assert len(want) == budget
        assert got == want


def test_requests_wait_for_a_free_slot(make_tiny_model: MakeModel) -> None:
    model = make_tiny_model(seed=1)
    prompts = [random_prompt(5 + i, seed=10 + i) for i in range(3)]
    solo = [generate(Engine(model, max_batch=1), p, greedy(6))[0].output for p in prompts]
    engine = Engine(model, max_batch=2)
    sequences = [engine.add(p, greedy(6))[0] for p in prompts]
    engine.step()
    assert [s.status for s in sequences] == [Status.RUNNING, Status.RUNNING, Status.WAITING]
    run(engine)
    assert [s.output for s in sequences] == solo
    assert all(s.finish_reason == "length" for s in sequences)


def test_streamed_text_equals_the_sequence_text(make_tiny_model: MakeModel) -> None:
    model = make_tiny_model()
    engine = Engine(model)
    sequences = engine.add(random_prompt(6), greedy(20))
    streamed = "".join(o.text for o in run(engine))
    assert streamed == sequences[0].text == detokenize(model, sequences[0].output)
    assert streamed.strip()


# --- n and seeds ----------------------------------------------------------------------------------


def test_n_choices_with_a_seed_are_reproducible(make_tiny_model: MakeModel) -> None:
    model = make_tiny_model()
    prompt = random_prompt(7)
    params = dict(temperature=1.0, seed=1234, n=3, max_tokens=8, ignore_eos=True)
    first = generate(Engine(model), prompt, SamplingParams(**params))  # type: ignore[arg-type]
    second = generate(Engine(model), prompt, SamplingParams(**params))  # type: ignore[arg-type]
    assert len(first) == 3
    assert [s.index for s in first] == [0, 1, 2]
    assert len({s.group for s in first}) == 1
    assert [s.output for s in first] == [s.output for s in second]
    assert all(len(s.output) == 8 for s in first)
    assert len({tuple(s.output) for s in first}) == 3  # three different draws, not one copied
    other = generate(Engine(model), prompt, SamplingParams(**{**params, "seed": 99}))  # type: ignore[arg-type]
    assert [s.output for s in other] != [s.output for s in first]


def test_each_choice_matches_a_single_request_with_its_derived_seed(make_tiny_model: MakeModel) -> None:
    """Choice i of (seed s, n) is seeded s + i: the prompt copied into its slot must give the same draws."""
    model = make_tiny_model()
    prompt = random_prompt(9, seed=3)
    choices = generate(Engine(model), prompt, SamplingParams(temperature=1.0, seed=50, n=3, max_tokens=6))
    for choice in choices:
        single = generate(
            Engine(model), prompt, SamplingParams(temperature=1.0, seed=50 + choice.index, max_tokens=6)
        )[0]
        assert single.output == choice.output


# --- how generation ends --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "penalty",
    [
        {"repetition_penalty": 1.3},
        {"frequency_penalty": 1.5},
        {"presence_penalty": 1.5},
        {"logit_bias": {1000: 5.0}},
    ],
)
def test_penalties_run_at_every_decode_step(make_tiny_model: MakeModel, penalty: dict) -> None:
    """Decode steps apply penalties in place on the logits: this must work inside the engine's step."""
    engine = Engine(make_tiny_model(), max_batch=2)
    sequence = generate(engine, random_prompt(6), greedy(24, **penalty))[0]
    assert len(sequence.output) == 24 and sequence.finish_reason == "length"


def test_strong_repetition_penalty_never_repeats(make_tiny_model: MakeModel) -> None:
    engine = Engine(make_tiny_model(), max_batch=1)
    prompt = [500] * 6
    plain = generate(engine, prompt, greedy(40))[0]
    assert len(set(plain.output)) < len(plain.output), "the unpenalised run repeats itself"
    penalised = generate(engine, prompt, greedy(40, repetition_penalty=100.0))[0]
    assert len(set(penalised.output)) == len(penalised.output)
    assert 500 not in penalised.output


def test_max_tokens_finishes_with_length(make_tiny_model: MakeModel) -> None:
    model = make_tiny_model()
    for max_tokens in (1, 7):
        seq = generate(Engine(model), random_prompt(4), greedy(max_tokens))[0]
        assert seq.finish_reason == "length"
        assert len(seq.output) == max_tokens
        assert seq.status is Status.FINISHED


def test_context_limit_finishes_with_length(make_tiny_model: MakeModel) -> None:
    model = make_tiny_model()
    engine = Engine(model, max_context=40)
    assert engine.context == 40
    seq = generate(engine, random_prompt(35), SamplingParams(temperature=0, ignore_eos=True))[0]
    assert seq.finish_reason == "length"
    assert len(seq.output) == 5


def test_stop_string_cuts_the_text(make_tiny_model: MakeModel) -> None:
    model = make_tiny_model()
    prompt = random_prompt(6)
    full_run = Engine(model)
    full_seq = full_run.add(prompt, greedy(40))[0]
    pieces = [o.text for o in run(full_run)]
    full = full_seq.text
    # A stop string that spans the boundary between two tokens in the middle of the text.
    k = next(i for i in range(len(pieces) // 2, len(pieces) - 1) if len(pieces[i]) >= 2 and pieces[i + 1])
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    expected = full[: full.find(stop)]
    assert 0 < len(expected) < len(full) - len(stop)

    engine = Engine(model)
    seq = engine.add(prompt, greedy(40, stop=[stop]))[0]
    streamed = "".join(o.text for o in run(engine))
    assert seq.finish_reason == "stop"
    assert seq.text == expected
    assert streamed == expected
    assert seq.output == full_seq.output[: len(seq.output)]
    assert len(seq.output) < len(full_seq.output)
    assert engine.idle


def test_stop_string_absent_changes_nothing(make_tiny_model: MakeModel) -> None:
    model = make_tiny_model()
    prompt = random_prompt(6)
    plain = generate(Engine(model), prompt, greedy(15))[0]
    assert "\u2603" not in plain.text
    # The second stop begins with the text's last characters: they are held back until the end, then
    # released when the generation ends by length.
    for stop in ["\u2603never\u2603", plain.text[-3:] + "\u2603"]:
        engine = Engine(model)
        stopped = engine.add(prompt, greedy(15, stop=[stop]))[0]
        streamed = "".join(o.text for o in run(engine))
        assert stopped.text == streamed == plain.text
        assert stopped.output == plain.output
        assert stopped.finish_reason == "length"


def _token_to_stop_on(model: LoadedModel, prompt: list[int]) -> tuple[list[int], int, int]:
    """A greedy run and a token of it (with text, first seen at index i) to end generation on."""
    full = generate(Engine(model), prompt, greedy(12))[0].output
    stops = model.tokenizer.end_of_turn_ids()
    i = next(
        i for i in range(3, len(full)) if full[i] not in full[:i] and model.tokenizer.token_bytes[full[i]]
    )
    assert full[i] not in stops
    return full, i, full[i]


def test_eos_token_ends_with_stop_and_is_not_in_the_text(make_tiny_model: MakeModel) -> None:
    prompt = random_prompt(6)
    full, i, token = _token_to_stop_on(make_tiny_model(), prompt)
    # Same seed, same weights: only the config's EOS id differs.
    model = make_tiny_model(eos_token_id=token)
    seq = generate(Engine(model), prompt, SamplingParams(temperature=0, max_tokens=12))[0]
    assert seq.finish_reason == "stop"
    assert seq.output == full[: i + 1]
    assert seq.text == detokenize(model, full[:i])
    assert seq.text != detokenize(model, full[: i + 1])
    # ignore_eos runs straight past it.
    seq = generate(Engine(model), prompt, greedy(12))[0]
    assert seq.output == full and seq.finish_reason == "length"


def test_stop_token_ids_end_with_stop(make_tiny_model: MakeModel) -> None:
    model = make_tiny_model()
    prompt = random_prompt(6)
    full, i, token = _token_to_stop_on(model, prompt)
    seq = generate(
        Engine(model), prompt, SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[token])
    )[0]
    assert seq.finish_reason == "stop"
    assert seq.output == full[: i + 1]
    assert seq.text == detokenize(model, full[:i])


def test_end_of_turn_token_stops_without_text(make_tiny_model: MakeModel) -> None:
    model = make_tiny_model()
    eos = model.tokenizer.eos_id
    assert eos is not None
    engine = Engine(model)
    seq = engine.add(random_prompt(5), SamplingParams(temperature=0, max_tokens=10, logit_bias={eos: 100}))[0]
    outputs = run(engine)
    assert seq.output == [eos]
    assert seq.finish_reason == "stop"
    assert seq.text == "" and [o.text for o in outputs] == [""]
    assert outputs[-1].finished


# --- KV blocks ------------------------------------------------------------------------------------


def test_abort_frees_the_blocks(make_tiny_model: MakeModel) -> None:
    model = make_tiny_model()
    engine = Engine(model, max_batch=4)
    assert engine.blocks.used == 0
    keep = engine.add(random_prompt(5, seed=1), greedy(8))
    drop = engine.add(random_prompt(9, seed=2), greedy(30, n=2))
    engine.step()
    engine.step()
    # One block each: the two choices share nothing here (their prompt fills no block), each has its own.
    assert engine.blocks.used == 3
    engine.abort(drop)
    assert engine.blocks.used == 1
    assert all(s.finish_reason == "abort" and s.blocks == [] for s in drop)
    produced = [len(s.output) for s in drop]
    run(engine)
    assert [len(s.output) for s in drop] == produced  # aborted sequences are not decoded further
    assert keep[0].finish_reason == "length" and len(keep[0].output) == 8
    assert engine.idle


def test_abort_of_a_waiting_request(make_tiny_model: MakeModel) -> None:
    engine = Engine(make_tiny_model(), max_batch=2)
    sequences = engine.add(random_prompt(5), greedy(5))
    engine.abort(sequences)
    assert not engine.has_work
    assert engine.step() == []
    assert sequences[0].finish_reason == "abort" and sequences[0].output == []
    assert engine.idle


def test_aborting_one_waiting_choice_keeps_it_aborted(make_tiny_model: MakeModel) -> None:
    engine = Engine(make_tiny_model(), max_batch=2)
    first, second = engine.add(random_prompt(5), greedy(5, n=2))
    engine.abort([second])
    run(engine)
    assert second.finish_reason == "abort" and second.output == []
    assert first.finish_reason == "length" and len(first.output) == 5
    assert engine.idle


def test_finished_request_frees_its_blocks(make_tiny_model: MakeModel) -> None:
    engine = Engine(make_tiny_model(), max_batch=3)
    seq = engine.add(random_prompt(5), greedy(30))[0]
    engine.step()
    assert engine.blocks.used == 1 and len(seq.blocks) == 1
    run(engine)
    assert engine.blocks.used == 0 and seq.blocks == []
    assert engine.running == []


def test_closing_generate_early_frees_the_blocks(make_tiny_model: MakeModel) -> None:
    engine = Engine(make_tiny_model(), max_batch=2)
    stream = engine.generate(random_prompt(5), greedy(50))
    first = next(stream)
    assert engine.blocks.used == 1
    stream.close()
    assert first.sequence.finish_reason == "abort"
    assert engine.idle


# --- prompt errors --------------------------------------------------------------------------------


def test_prompt_longer_than_the_context_is_rejected(make_tiny_model: MakeModel) -> None:
    model = make_tiny_model()
    engine = Engine(model, max_context=64)
    for prompt, params in [
        (random_prompt(64), SamplingParams()),
        (random_prompt(200), SamplingParams()),
        (random_prompt(60), SamplingParams(max_tokens=5)),
    ]:
        with pytest.raises(PromptError) as info:
            engine.add(prompt, params)
        assert info.value.code == "context_length_exceeded"
        assert "64" in info.value.message
    assert not engine.has_work
    # Exactly filling the context is fine.
    assert engine.check_prompt(random_prompt(60), SamplingParams(max_tokens=4)) == 4
    assert engine.check_prompt(random_prompt(63), SamplingParams()) == 1


def test_empty_prompt_is_rejected(make_tiny_model: MakeModel) -> None:
    engine = Engine(make_tiny_model())
    with pytest.raises(PromptError) as info:
        engine.add([], SamplingParams())
    assert info.value.code != "context_length_exceeded"
    assert not engine.has_work


def test_bad_sampling_params_and_n_are_rejected(make_tiny_model: MakeModel) -> None:
    engine = Engine(make_tiny_model(), max_batch=2)
    with pytest.raises(PromptError, match="top_p") as info:
        engine.add(random_prompt(4), SamplingParams(top_p=0))
    assert info.value.code == "invalid_value"
    with pytest.raises(PromptError, match="logit_bias"):
        engine.add(random_prompt(4), SamplingParams(logit_bias={49152: 1.0}))
    for bad in (
        SamplingParams(temperature=float("nan")),
        SamplingParams(temperature=float("inf")),
        SamplingParams(repetition_penalty=1e-40),
    ):
        with pytest.raises(PromptError):
            engine.add(random_prompt(4), bad)
    with pytest.raises(PromptError, match="n=3"):
        engine.add(random_prompt(4), SamplingParams(n=3))
    assert not engine.has_work


# --- the KV cache against a from-scratch recompute ------------------------------------------------

CONFIGS = {
    "llama": {},
    "qwen2": dict(model_type="qwen2", attention_bias=True, tie_word_embeddings=False),
    "multi-head": dict(num_key_value_heads=4),
    "multi-query": dict(num_key_value_heads=1),
    "head-dim-32": dict(head_dim=32),
}


def check_against_recompute(
    model: LoadedModel, engine: Engine, prompt: list[int], max_tokens: int, monkeypatch: pytest.MonkeyPatch
) -> Sequence:
    """Greedy-generate; every logits row the engine computed must match the from-scratch recompute."""
    calls = record_logits(model, monkeypatch)
    seq = generate(engine, prompt, greedy(max_tokens))[0]
    monkeypatch.undo()
    assert len(seq.output) == max_tokens
    engine_logits = torch.cat([c[-1:] for c in calls])  # one sequence: the last row of each call
    assert engine_logits.shape[0] == max_tokens
    reference = recompute_logits(model, prompt + seq.output[:-1])[len(prompt) - 1 :]
    torch.testing.assert_close(engine_logits, reference, atol=1e-4, rtol=0)
    assert reference.argmax(dim=-1).tolist() == seq.output
    return seq


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_matches_recompute(
    make_tiny_model: MakeModel, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    model = make_tiny_model(seed=2, **CONFIGS[name])
    check_against_recompute(model, Engine(model), random_prompt(11, seed=4), 16, monkeypatch)


def test_qwen2_config_builds_biases_and_an_untied_head(make_tiny_model: MakeModel) -> None:
    model = make_tiny_model(**CONFIGS["qwen2"])
    assert model.module.layers[0].qkv_proj.bias is not None
    assert model.module.lm_head.weight.data_ptr() != model.module.embed_tokens.weight.data_ptr()
    assert float(model.module.layers[0].qkv_proj.bias.detach().abs().sum()) > 0


def scatter_free_blocks(engine: Engine) -> None:
    """Hold every other block, so that what the engine allocates next is never consecutive."""
    held = [engine.blocks.allocate() for _ in range(engine.blocks.num_blocks)]
    engine.blocks.release(held[::2])


@pytest.mark.parametrize(
    ("name", "prompt_length"),
    [("llama", 500), ("llama", 600), ("qwen2", 500)],
    ids=["decode-over-many-blocks", "chunked-prefill", "qwen2"],
)
def test_scattered_blocks_give_the_same_tokens(
    make_tiny_model: MakeModel, monkeypatch: pytest.MonkeyPatch, name: str, prompt_length: int
) -> None:
    """A sequence whose blocks are scattered (gathered reads) computes what a consecutive one does."""
    model = make_tiny_model(seed=3, max_position_embeddings=1024, **CONFIGS[name])
    prompt = random_prompt(prompt_length, seed=5)
    consecutive = generate(Engine(model, max_batch=2, max_context=1024), prompt, greedy(40))[0]
    engine = Engine(model, max_batch=2, max_context=1024)
    scatter_free_blocks(engine)
    check_against_recompute(model, engine, prompt, 40, monkeypatch)
    scattered = generate(engine, prompt, greedy(40))[0]
    assert scattered.output == consecutive.output


def test_kv_memory_budget_bounds_the_context_and_admission(make_tiny_model: MakeModel) -> None:
    model = make_tiny_model(max_position_embeddings=1024)
    per_block = bytes_per_position(model.config) * BLOCK_SIZE
    engine = Engine(model, max_batch=4, kv_memory=8 * per_block)
    assert engine.blocks.num_blocks == 8 and engine.context == 8 * BLOCK_SIZE
    with pytest.raises(PromptError, match="context"):
        engine.check_prompt(random_prompt(8 * BLOCK_SIZE), greedy(1))
    # Two 3-block prompts fit; the third waits for memory although the batch has room.
    sequences = [engine.add(random_prompt(40, seed=i), greedy(5))[0] for i in range(3)]
    engine.step()
    assert [s.status for s in sequences] == [Status.RUNNING, Status.RUNNING, Status.WAITING]
    run(engine)
    assert all(s.finish_reason == "length" for s in sequences)
    with pytest.raises(TertuliaError, match="too small"):
        Engine(model, kv_memory=per_block)


def test_preempted_sequences_resume_and_finish_the_same(make_tiny_model: MakeModel) -> None:
    """Out of blocks, the newest sequence is preempted, recomputed later, and generates the same tokens."""
    model = make_tiny_model(seed=1, max_position_embeddings=1024)
    prompts = [random_prompt(30, seed=20 + i) for i in range(3)]
    solo = [generate(Engine(model, max_batch=1), p, greedy(60))[0].output for p in prompts]
    per_block = bytes_per_position(model.config) * BLOCK_SIZE
    # 3 x (30 + 60) positions need 18 blocks; 10 force preemptions along the way.
    engine = Engine(model, max_batch=3, kv_memory=10 * per_block, prefix_cache=False)
    sequences = [engine.add(p, greedy(60))[0] for p in prompts]
    run(engine)
    assert engine.preemptions > 0
    assert [s.output for s in sequences] == solo
    assert engine.idle


def test_a_sequence_that_finished_this_step_is_never_preempted(make_tiny_model: MakeModel) -> None:
    """Out of blocks, the victim is a running sequence, never one that just finished (and awaits release)."""
    model = make_tiny_model(seed=2, max_position_embeddings=1024)
    per_block = bytes_per_position(model.config) * BLOCK_SIZE
    engine = Engine(model, max_batch=2, kv_memory=4 * per_block, prefix_cache=False)
    grower = engine.add(random_prompt(15, seed=1), greedy(40))[0]
    engine.step()
    engine.step()  # the grower needs its second block at the next step
    # Fills the three other blocks and finishes in its prefill, in the same step the grower runs out.
    brief = engine.add(random_prompt(3 * BLOCK_SIZE, seed=2), greedy(1))[0]
    engine.step()
    assert brief.finish_reason == "length" and len(brief.output) == 1
    # Its blocks were released before decode grew the other sequence: nobody had to be preempted.
    assert engine.preemptions == 0 and grower.status is Status.RUNNING and len(grower.blocks) == 2
    run(engine)
    assert len(brief.output) == 1
    assert grower.output == generate(Engine(model, max_batch=1), grower.prompt, greedy(40))[0].output


def test_eviction_keeps_the_start_of_a_cached_prompt(make_tiny_model: MakeModel) -> None:
    """Evicting one block of a cached prompt takes its last block, so the rest is still found."""
    model = make_tiny_model(seed=1, max_position_embeddings=1024)
    per_block = bytes_per_position(model.config) * BLOCK_SIZE
    engine = Engine(model, max_batch=2, kv_memory=10 * per_block)
    prompt = random_prompt(4 * BLOCK_SIZE + 5, seed=1)
    generate(engine, prompt, greedy(1))  # caches its 4 full blocks
    free = engine.blocks.available - 4
    generate(engine, random_prompt(BLOCK_SIZE * free + 1, seed=2), greedy(1))  # evicts exactly one
    before = engine.blocks.hits
    generate(engine, prompt, greedy(1))
    assert engine.blocks.hits - before == 3


def test_prefix_cache_reuses_a_shared_prompt_start(make_tiny_model: MakeModel) -> None:
    model = make_tiny_model(seed=4)
    system = random_prompt(3 * BLOCK_SIZE + 5, seed=7)
    first_prompt, second_prompt = system + random_prompt(9, seed=8), system + random_prompt(12, seed=9)
    engine = Engine(model, max_batch=2)
    generate(engine, first_prompt, greedy(5))
    assert engine.blocks.hits == 0
    reused = generate(engine, second_prompt, greedy(12))[0]
    assert engine.blocks.hits == 3  # the three full blocks of the shared start
    fresh = generate(Engine(model, max_batch=2, prefix_cache=False), second_prompt, greedy(12))[0]
    assert reused.output == fresh.output
    # A prompt that differs inside the first block finds nothing.
    generate(engine, [system[0] + 1, *system[1:]], greedy(2))
    assert engine.blocks.hits == 3


def test_batched_decode_at_different_positions_matches_recompute(
    make_tiny_model: MakeModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = make_tiny_model(seed=4)
    prompts = [random_prompt(n, seed=n) for n in (4, 10, 17)]
    engine = Engine(model, max_batch=3)
    calls = record_logits(model, monkeypatch)
    sequences = [engine.add(p, greedy(8))[0] for p in prompts]
    run(engine)
    monkeypatch.undo()
    # Step 1 prefills the three prompts: in one forward where every matmul computes a row on its own,
    # else one call each. Every later call decodes all three together.
    prefills = 1 if engine.runner.rows_independent else 3
    assert [c.shape[0] for c in calls] == [3 // prefills] * prefills + [3] * 7
    first = torch.cat(calls[:prefills])
    for row, (prompt, seq) in enumerate(zip(prompts, sequences, strict=True)):
        reference = recompute_logits(model, prompt + seq.output[:-1])[len(prompt) - 1 :]
        got = torch.cat([first[row : row + 1], *[c[row : row + 1] for c in calls[prefills:]]])
        torch.testing.assert_close(got, reference, atol=1e-4, rtol=0)


# --- the real model -------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_model_knows_the_capital_of_france(real_model: LoadedModel) -> None:
    engine = Engine(real_model, max_batch=8, max_context=1024, quantization="none")
    params = SamplingParams(temperature=0, max_tokens=64)
    replies = []
    for question in PARIS_QUESTIONS:
        replies += engine.add(real_model.template.encode([{"role": "user", "content": question}]), params)
    run(engine)
    assert_mostly([seq.text for seq in replies], "Paris")
    ended = [seq for seq in replies if seq.finish_reason == "stop"]
    assert ended, [seq.text for seq in replies]
    for seq in ended:  # ended by the end-of-turn token, which is not part of the text
        assert seq.output[-1] in engine.stop_ids
        assert "<|im_end|>" not in seq.text


def test_tiny_temperature_and_huge_seed_sample_fine(make_tiny_model: MakeModel) -> None:
    engine = Engine(make_tiny_model(), max_batch=2)
    tiny = generate(
        engine, random_prompt(4), SamplingParams(temperature=1e-40, max_tokens=5, ignore_eos=True)
    )[0]
    greedy_run = generate(engine, random_prompt(4), greedy(5))[0]
    assert tiny.output == greedy_run.output
    seeded = SamplingParams(temperature=1.0, seed=-(2**70), n=2, max_tokens=3, ignore_eos=True)
    assert all(len(s.output) == 3 for s in generate(engine, random_prompt(4), seeded))


def test_long_prompt_prefills_in_chunks_while_others_keep_decoding(make_tiny_model: MakeModel) -> None:
    from tertulia.engine.scheduler import PREFILL_CHUNK

    model = make_tiny_model(max_position_embeddings=4096)
    long_prompt = random_prompt(3 * PREFILL_CHUNK - 10, seed=3)
    solo_long = generate(Engine(model, max_batch=2), long_prompt, greedy(6))[0].output
    solo_short = generate(Engine(model, max_batch=2), random_prompt(5), greedy(12))[0].output

    engine = Engine(model, max_batch=2)
    short = engine.add(random_prompt(5), greedy(12))[0]
    engine.step()
    long = engine.add(long_prompt, greedy(6))[0]
    for expected_chunks in (1, 2):
        before = len(short.output)
        engine.step()
        assert len(short.output) == before + 1, "the running stream got its token during the prefill"
        assert long.output == [] and engine.prefilled == expected_chunks * PREFILL_CHUNK
    engine.step()
    assert len(long.output) == 1
    run(engine)
    assert long.output == solo_long and short.output == solo_short


def test_abort_during_prefill_frees_the_slots(make_tiny_model: MakeModel) -> None:
    from tertulia.engine.scheduler import PREFILL_CHUNK

    engine = Engine(make_tiny_model(max_position_embeddings=4096), max_batch=3)
    prompt_length = 2 * PREFILL_CHUNK + 5
    sequences = engine.add(random_prompt(prompt_length), greedy(4, n=2))
    engine.step()
    # The prompt's blocks once, plus the second choice's own copy of the partly filled last block.
    assert engine.prefilling is not None
    assert engine.blocks.used == engine.blocks.blocks_for(prompt_length) + 1
    engine.abort(sequences)
    run(engine)
    assert engine.idle and engine.prefilling is None
    assert all(s.finish_reason == "abort" and s.output == [] for s in sequences)
