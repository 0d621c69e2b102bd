"""The sampler on crafted logits: greedy, filters, seeds, penalties, biases, validation and statistics."""

from __future__ import annotations

import math

import pytest
import torch

from tertulia.engine.sampling import (
    SamplingParams,
    TokenHistory,
    apply_penalties,
    make_generator,
    sample,
    top_logprobs,
)

VOCAB = 50


def draw(
    logits: torch.Tensor,
    params: SamplingParams,
    *,
    count: int,
    seed: int = 0,
    history: TokenHistory | None = None,
) -> list[int]:
    """`count` tokens sampled from the same 1-D logits with one generator (the sampler edits in place)."""
    generator = make_generator(seed)
    history = history or TokenHistory([], logits.shape[-1], params)
    return [
        int(sample(logits.clone().unsqueeze(0), [params], [history], [generator])[0]) for _ in range(count)
    ]


def draw_batch(logits: torch.Tensor, params: SamplingParams, *, count: int, seed: int = 0) -> list[int]:
    """`count` draws at once: the same logits in `count` rows, each row with its own generator."""
    batch = logits.unsqueeze(0).repeat(count, 1)
    histories = [TokenHistory([], logits.shape[-1], params) for _ in range(count)]
    generators = [make_generator(seed + i) for i in range(count)]
    return sample(batch, [params] * count, histories, generators).tolist()


def frequencies(tokens: list[int], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=vocab).float() / len(tokens)


@pytest.fixture
def logits() -> torch.Tensor:
    """Random logits with a clear argmax (no ties) over a 50-token vocabulary."""
    generator = torch.Generator().manual_seed(1234)
    return torch.randn(VOCAB, generator=generator) * 2


# --- greedy and deterministic filters -------------------------------------------------------------


def test_temperature_zero_is_argmax() -> None:
    rows = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(5)) * 3
    # Filters and a seed are irrelevant when greedy.
    params = SamplingParams(temperature=0, top_k=5, top_p=0.3, min_p=0.2, seed=1)
    histories = [TokenHistory([], VOCAB, params) for _ in range(6)]
    generators = [make_generator(i) for i in range(6)]
    tokens = sample(rows.clone(), [params] * 6, histories, generators)
    assert tokens.tolist() == rows.argmax(dim=-1).tolist()
    assert params.greedy


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.0, 50.0])
def test_top_k_one_equals_greedy_at_any_temperature(logits: torch.Tensor, temperature: float) -> None:
    tokens = draw_batch(logits, SamplingParams(temperature=temperature, top_k=1), count=200)
    assert set(tokens) == {int(logits.argmax())}


def test_top_k_keeps_exactly_the_k_best(logits: torch.Tensor) -> None:
    tokens = draw_batch(logits, SamplingParams(temperature=5.0, top_k=3), count=600)
    assert set(tokens) == set(logits.topk(3).indices.tolist())


def test_top_p_tiny_is_argmax(logits: torch.Tensor) -> None:
    flat = logits / 10  # nearly uniform: without the filter other tokens would be drawn
    assert set(draw_batch(flat, SamplingParams(temperature=1.0), count=200)) != {int(flat.argmax())}
    tokens = draw_batch(flat, SamplingParams(temperature=1.0, top_p=1e-6), count=200)
    assert set(tokens) == {int(flat.argmax())}


def test_top_p_keeps_the_smallest_nucleus() -> None:
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    # Sorted: 0.5, 0.3, 0.15, 0.05; mass before each: 0, 0.5, 0.8, 0.95. With top_p=0.7 the nucleus is {1, 3}.
    tokens = draw_batch(probs.log(), SamplingParams(temperature=1.0, top_p=0.7), count=1000)
    assert set(tokens) == {1, 3}
    freq = frequencies(tokens, 4)
    assert freq[1] == pytest.approx(0.5 / 0.8, abs=0.05)


def test_min_p_filters_tokens_below_the_threshold() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    # min_p=0.2 -> threshold 0.2 * 0.5 = 0.1: token 3 (0.05) goes, token 2 (0.15) stays.
    tokens = draw_batch(probs.log(), SamplingParams(temperature=1.0, min_p=0.2), count=3000)
    assert 3 not in tokens
    assert {0, 1, 2} <= set(tokens)
    # Without min_p token 3 does appear in as many draws.
    assert 3 in draw_batch(probs.log(), SamplingParams(temperature=1.0), count=3000)


def test_min_p_is_relative_to_the_tempered_distribution() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    # At temperature 2 the probabilities flatten (~0.38, 0.29, 0.21, 0.12): token 3 clears 0.2 * 0.38.
    tokens = draw_batch(probs.log(), SamplingParams(temperature=2.0, min_p=0.2), count=3000)
    assert 3 in tokens
    tokens = draw_batch(probs.log(), SamplingParams(temperature=2.0, min_p=0.35), count=3000)
    assert 3 not in tokens and 2 in tokens


def test_top_p_applies_before_min_p() -> None:
    """The documented (HF) order: top-p on the full distribution, then min-p."""
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    # top_p=0.75: mass before each token is 0, 0.4, 0.7, 0.9, so the nucleus is {0, 1, 2}; min_p=0.3
    # (threshold 0.12) then removes nothing more. The other order would renormalize to 0.9 after min-p
    # dropped token 3, and top-p would then drop token 2 too (0.7 > 0.75 * 0.9).
    tokens = draw_batch(probs.log(), SamplingParams(temperature=1.0, top_p=0.75, min_p=0.3), count=1000)
    assert set(tokens) == {0, 1, 2}


# --- seeds ----------------------------------------------------------------------------------------


def test_same_seed_same_tokens(logits: torch.Tensor) -> None:
    params = SamplingParams(temperature=1.5)
    first = draw(logits / 4, params, count=100, seed=42)
    second = draw(logits / 4, params, count=100, seed=42)
    assert first == second
    assert len(set(first)) > 5  # really sampled, not a constant


def test_different_seeds_draw_differently(logits: torch.Tensor) -> None:
    params = SamplingParams(temperature=1.5)
    runs = [draw(logits / 4, params, count=100, seed=seed) for seed in (1, 2, 3)]
    assert runs[0] != runs[1] and runs[1] != runs[2] and runs[0] != runs[2]


def test_unseeded_generators_differ() -> None:
    a, b = make_generator(None), make_generator(None)
    assert a.initial_seed() != b.initial_seed()


def test_seeded_row_is_independent_of_its_batch(logits: torch.Tensor) -> None:
    """A seeded request gives the same tokens whatever else (and whichever filters) shares its batch."""
    mine = SamplingParams(temperature=1.2, seed=9)
    alone = draw(logits / 3, mine, count=40, seed=9)
    others = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.7, top_k=3),
        SamplingParams(temperature=1.0, top_p=0.5, min_p=0.1),
    ]
    generators = [make_generator(9)] + [make_generator(100 + i) for i in range(3)]
    params = [mine, *others]
    histories = [TokenHistory([], VOCAB, p) for p in params]
    together = []
    for _ in range(40):
        batch = torch.stack([logits / 3, logits, logits * 0.5, logits.flip(0)])
        together.append(int(sample(batch, params, histories, generators)[0]))
    assert together == alone


def test_mixed_batch_of_greedy_and_sampled_rows(logits: torch.Tensor) -> None:
    rows = torch.stack([logits, logits.flip(0), logits / 4, logits / 4])
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.0, seed=3),
        SamplingParams(temperature=1.0, top_k=1),
    ]
    histories = [TokenHistory([], VOCAB, p) for p in params]
    generators = [make_generator(i) for i in range(4)]
    sampled_row = []
    for _ in range(60):
        tokens = sample(rows.clone(), params, histories, generators).tolist()
        assert tokens[0] == int(logits.argmax())
        assert tokens[1] == int(logits.flip(0).argmax())
        assert tokens[3] == int(logits.argmax())
        sampled_row.append(tokens[2])
    assert len(set(sampled_row)) > 3  # the sampled row is not dragged into greedy by its neighbours


# --- logit bias -----------------------------------------------------------------------------------


def test_logit_bias_plus_100_forces_a_token(logits: torch.Tensor) -> None:
    weakest = int(logits.argmin())
    params = SamplingParams(temperature=1.0, logit_bias={weakest: 100.0})
    assert set(draw_batch(logits, params, count=200)) == {weakest}
    greedy = SamplingParams(temperature=0, logit_bias={weakest: 100.0})
    assert draw(logits, greedy, count=1) == [weakest]


def test_logit_bias_minus_100_bans_the_argmax(logits: torch.Tensor) -> None:
    best, second = logits.topk(2).indices.tolist()
    greedy = SamplingParams(temperature=0, logit_bias={best: -100.0})
    assert draw(logits, greedy, count=1) == [second]
    sampled = SamplingParams(temperature=1.0, logit_bias={best: -100.0})
    tokens = draw_batch(logits, sampled, count=1000)
    assert best not in tokens
    assert best in draw_batch(logits, SamplingParams(temperature=1.0), count=1000)


def test_logit_bias_adds_exact_values() -> None:
    row = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    params = SamplingParams(logit_bias={0: 2.5, 3: -1.0})
    out = apply_penalties(row, [params], [TokenHistory([], 4, params)])
    assert out.tolist() == [[3.5, 2.0, 3.0, 3.0]]


# --- penalties ------------------------------------------------------------------------------------

BASE = [2.0, -1.0, 0.5, 3.0, -2.0, 1.0]
PROMPT = [0, 1]
OUTPUT = [3, 3, 2]  # token 3 twice, token 2 once; tokens 4 and 5 never seen


def penalized(params: SamplingParams) -> list[float]:
    history = TokenHistory(PROMPT, len(BASE), params)
    for token in OUTPUT:
        history.add(token)
    return apply_penalties(torch.tensor([BASE]), [params], [history])[0].tolist()


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits() -> None:
    # Seen = prompt + output = {0, 1, 2, 3}; positive logits are divided by 2, negative multiplied by 2.
    assert penalized(SamplingParams(repetition_penalty=2.0)) == pytest.approx(
        [1.0, -2.0, 0.25, 1.5, -2.0, 1.0]
    )
    # A penalty below 1 favours repetition: the inverse operation.
    assert penalized(SamplingParams(repetition_penalty=0.5)) == pytest.approx(
        [4.0, -0.5, 1.0, 6.0, -2.0, 1.0]
    )


def test_frequency_penalty_scales_with_output_counts_only() -> None:
    # Output counts: token 3 -> 2, token 2 -> 1. Prompt tokens 0 and 1 are not penalized.
    assert penalized(SamplingParams(frequency_penalty=0.5)) == pytest.approx([2.0, -1.0, 0.0, 2.0, -2.0, 1.0])
    assert penalized(SamplingParams(frequency_penalty=-1.0)) == pytest.approx(
        [2.0, -1.0, 1.5, 5.0, -2.0, 1.0]
    )


def test_presence_penalty_is_flat_for_any_output_token() -> None:
    assert penalized(SamplingParams(presence_penalty=0.75)) == pytest.approx(
        [2.0, -1.0, -0.25, 2.25, -2.0, 1.0]
    )


def test_penalties_combine_in_the_documented_order() -> None:
    # Bias first, then repetition (multiplicative, prompt + output), then frequency/presence (additive).
    params = SamplingParams(
        logit_bias={5: 1.0, 3: 1.0},
        repetition_penalty=2.0,
        frequency_penalty=0.5,
        presence_penalty=0.25,
    )
    expected = [
        2.0 / 2,  # seen in the prompt
        -1.0 * 2,  # seen in the prompt, negative
        0.5 / 2 - (1 * 0.5 + 0.25),  # output once
        (3.0 + 1.0) / 2 - (2 * 0.5 + 0.25),  # biased, output twice
        -2.0,  # unseen
        1.0 + 1.0,  # biased, unseen
    ]
    assert penalized(params) == pytest.approx(expected)


def test_no_penalties_leave_logits_untouched_and_skip_history() -> None:
    params = SamplingParams()
    history = TokenHistory(PROMPT, len(BASE), params)
    assert history.output_counts is None and history.seen is None
    assert penalized(params) == BASE


def test_penalties_apply_per_row() -> None:
    rows = torch.tensor([BASE, BASE])
    params = [SamplingParams(presence_penalty=1.0), SamplingParams()]
    histories = [TokenHistory([], len(BASE), p) for p in params]
    for history in histories:
        history.add(0)
    out = apply_penalties(rows, params, histories)
    assert out[0, 0] == pytest.approx(1.0)
    assert out[1].tolist() == BASE


def test_frequency_penalty_steers_sampling_away_from_repeats() -> None:
    logits = torch.tensor([5.0, 4.0, -5.0])
    params = SamplingParams(temperature=0, frequency_penalty=2.0)
    history = TokenHistory([], 3, params)
    generator = make_generator(0)
    tokens = []
    for _ in range(4):
        token = int(sample(logits.clone().unsqueeze(0), [params], [history], [generator])[0])
        history.add(token)
        tokens.append(token)
    # 5 vs 4: token 0, then 5-2=3 < 4 -> token 1, then 3 vs 4-2=2 -> token 0, then 1 vs 2 -> token 1.
    assert tokens == [0, 1, 0, 1]


# --- validation -----------------------------------------------------------------------------------

INVALID = [
    ("temperature", dict(temperature=-0.1)),
    ("temperature", dict(temperature=math.nan)),
    ("top_p", dict(top_p=0.0)),
    ("top_p", dict(top_p=1.5)),
    ("top_k", dict(top_k=-1)),
    ("min_p", dict(min_p=-0.1)),
    ("min_p", dict(min_p=1.01)),
    ("frequency_penalty", dict(frequency_penalty=2.5)),
    ("frequency_penalty", dict(frequency_penalty=-2.01)),
    ("presence_penalty", dict(presence_penalty=-3.0)),
    ("presence_penalty", dict(presence_penalty=2.01)),
    ("repetition_penalty", dict(repetition_penalty=0.0)),
    ("repetition_penalty", dict(repetition_penalty=-1.0)),
    ("n", dict(n=0)),
    ("max_tokens", dict(max_tokens=0)),
    ("stop", dict(stop=["ok", ""])),
    ("logprobs", dict(logprobs=21)),
    ("logprobs", dict(logprobs=-1)),
    ("logit_bias", dict(logit_bias={VOCAB: 1.0})),
    ("logit_bias", dict(logit_bias={-1: 1.0})),
    ("logit_bias", dict(logit_bias={3: 100.5})),
    ("logit_bias", dict(logit_bias={3: -101.0})),
]


@pytest.mark.parametrize(("field", "values"), INVALID, ids=[f"{f}-{v}" for f, v in INVALID])
def test_validate_rejects_out_of_range_values(field: str, values: dict) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**values).validate(VOCAB)


def test_validate_accepts_the_boundaries() -> None:
    SamplingParams().validate(VOCAB)
    SamplingParams(
        temperature=0,
        top_p=1.0,
        top_k=VOCAB * 10,
        min_p=1.0,
        frequency_penalty=-2.0,
        presence_penalty=2.0,
        repetition_penalty=0.01,
        n=5,
        max_tokens=1,
        stop=["a", "\n\n"],
        logprobs=20,
        logit_bias={0: -100.0, VOCAB - 1: 100.0},
    ).validate(VOCAB)
    SamplingParams(logprobs=0, min_p=0.0, frequency_penalty=2.0, presence_penalty=-2.0).validate(VOCAB)


# --- statistics -----------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_empirical_frequencies_match_softmax(temperature: float) -> None:
    logits = torch.tensor([1.0, 0.0, -0.5, 2.0])
    tokens = draw_batch(logits, SamplingParams(temperature=temperature), count=4000, seed=77)
    expected = torch.softmax(logits / temperature, dim=-1)
    # Binomial standard error is at most 0.008 at n=4000; 0.03 is several of them.
    assert frequencies(tokens, 4).tolist() == pytest.approx(expected.tolist(), abs=0.03)


def test_large_top_k_does_not_filter() -> None:
    logits = torch.tensor([1.0, 0.0, -0.5, 2.0])
    tokens = draw_batch(logits, SamplingParams(temperature=1.0, top_k=100), count=4000, seed=3)
    expected = torch.softmax(logits, dim=-1)
    assert frequencies(tokens, 4).tolist() == pytest.approx(expected.tolist(), abs=0.03)


# --- logprobs -------------------------------------------------------------------------------------


def test_top_logprobs_reports_chosen_and_alternatives() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    logp = torch.log_softmax(logits, dim=-1)
    rows = top_logprobs(logits, torch.tensor([2, 0]), 2)
    chosen, alternatives = rows[0]
    assert chosen == pytest.approx(float(logp[0, 2]))
    assert [t for t, _ in alternatives] == [1, 2]
    assert [v for _, v in alternatives] == pytest.approx([float(logp[0, 1]), float(logp[0, 2])])
    assert rows[1][0] == pytest.approx(math.log(0.25))
    assert top_logprobs(logits, torch.tensor([1, 1]), 0)[0][1] == []


def test_a_heavy_tail_is_sampled_in_proportion() -> None:
    """One likely token and 20,000 unlikely ones that together weigh about as much (the tail stage)."""
    logits = torch.zeros(20_001)
    logits[0] = 10.0
    tokens = torch.tensor(draw_batch(logits, SamplingParams(temperature=1.0), count=4000, seed=5))
    expected_head = math.exp(10) / (math.exp(10) + 20_000)  # 0.524
    assert float((tokens == 0).float().mean()) == pytest.approx(expected_head, abs=0.03)
    tail = tokens[tokens != 0]
    assert len(set(tail.tolist())) > 0.8 * len(tail)  # spread over the tail, not a few favourites
    assert float(tail.float().mean()) == pytest.approx(10_000, rel=0.05)


def test_float_noise_in_the_logits_does_not_change_a_seeded_draw() -> None:
    """Batched and solo logits differ in their last bits; the same seed must still pick the same token."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(49_152, generator=generator) * 3
    noisy = logits * (1 + 1e-6 * torch.randn(49_152, generator=generator))
    params = SamplingParams(temperature=1.0)
    clean_draws = draw_batch(logits, params, count=3000, seed=11)
    noisy_draws = draw_batch(noisy, params, count=3000, seed=11)
    assert sum(a != b for a, b in zip(clean_draws, noisy_draws, strict=True)) == 0
