"""Sampling parameters and the sampler that turns a batch of logits into next tokens.

Order of operations follows common practice (HF/vLLM): logit bias, repetition penalty (prompt and
output, multiplicative), frequency/presence penalties (output only, additive, as in OpenAI's API),
then temperature, top-k, top-p and min-p, then a draw from each sequence's own generator, so a
seeded request gives the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch

# Ranges outside which sampling degenerates (inf/NaN logits); NaN fails every comparison and is refused.
MAX_TEMPERATURE = 100.0
GREEDY_BELOW = 1e-5
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0


_NUMBERS = ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty")


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    n: int = 1
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    json_object: bool = False  # constrain the output to a JSON object (see json_mode.py)

    def validate(self, vocab_size: int) -> None:
        """Raise ValueError with a message fit for an API error.

        The interfaces check options against their one table (`providers.options`) first; this is the
        engine's own guard, so that nothing reaching it can break a step: types, and the ranges
        outside which the arithmetic degenerates (inf/NaN logits, tensors that overflow).
        """
        self._check_types()
        checks = [
            (0 <= self.temperature <= MAX_TEMPERATURE, f"temperature must be in [0, {MAX_TEMPERATURE}]"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0 (0 disables it; past the vocabulary it keeps all)"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (
                MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY,
                f"repetition_penalty must be in [{MIN_REPETITION_PENALTY}, {MAX_REPETITION_PENALTY}]",
            ),
            (self.n >= 1, "n must be >= 1"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens must be >= 1"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in [0, 20]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        for token in self.stop_token_ids:
            if not 0 <= token < vocab_size:
                raise ValueError(f"stop_token_ids has {token}, outside the vocabulary (0..{vocab_size - 1})")
        for token, bias in self.logit_bias.items():
            if not 0 <= token < vocab_size:
                raise ValueError(f"logit_bias token {token} is outside the vocabulary (0..{vocab_size - 1})")
            if not -100 <= bias <= 100:
                raise ValueError("logit_bias values must be in [-100, 100]")

    def _check_types(self) -> None:
        def integer(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def real(value: object) -> bool:
            return isinstance(value, int | float) and not isinstance(value, bool)

        for name in _NUMBERS:
            if not real(getattr(self, name)):
                raise ValueError(f"{name} must be a number")
        for name in ("top_k", "n"):
            if not integer(getattr(self, name)):
                raise ValueError(f"{name} must be an integer")
        for name in ("seed", "max_tokens", "logprobs"):
            if getattr(self, name) is not None and not integer(getattr(self, name)):
                raise ValueError(f"{name} must be an integer")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            raise ValueError("stop must be a list of strings")
        if not isinstance(self.stop_token_ids, list) or not all(integer(t) for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be a list of integers")
        if not isinstance(self.logit_bias, dict) or not all(
            integer(k) and real(v) for k, v in self.logit_bias.items()
        ):
            raise ValueError("logit_bias must map token ids to numbers")

    @property
    def greedy(self) -> bool:
        # Below this, dividing logits by the temperature overflows float32: it is argmax anyway.
        return self.temperature < GREEDY_BELOW


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    # Any integer seed is accepted (OpenAI's are int64, possibly negative): fold it into range.
    generator.manual_seed(seed % 2**63 if seed is not None else secrets.randbits(63))
    return generator


class TokenHistory:
    """Counts of each token a sequence has seen, kept only when a penalty needs them."""

    def __init__(self, prompt: list[int], vocab_size: int, params: SamplingParams) -> None:
        self.needs_output = params.frequency_penalty != 0 or params.presence_penalty != 0
        self.needs_all = params.repetition_penalty != 1.0
        self.output_counts = torch.zeros(vocab_size) if self.needs_output else None
        self.seen = torch.zeros(vocab_size, dtype=torch.bool) if self.needs_all else None
        if self.seen is not None and prompt:
            self.seen[torch.tensor(prompt)] = True

    def add(self, token: int) -> None:
        if self.output_counts is not None:
            self.output_counts[token] += 1
        if self.seen is not None:
            self.seen[token] = True


def apply_penalties(
    logits: torch.Tensor, params: list[SamplingParams], histories: list[TokenHistory]
) -> torch.Tensor:
    """Logit bias and penalties, row by row (only rows that ask for them pay for them)."""
    for row, (p, history) in enumerate(zip(params, histories, strict=True)):
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias.keys()))
            logits[row, ids] += torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype)
        if history.seen is not None:
            seen = logits[row, history.seen]
            logits[row, history.seen] = torch.where(
                seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty
            )
        if history.output_counts is not None:
            counts = history.output_counts
            logits[row] -= counts * p.frequency_penalty + (counts > 0).to(logits.dtype) * p.presence_penalty
    return logits


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    histories: list[TokenHistory],
    generators: list[torch.Generator],
    allowed: list[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Next token for each row of `logits` [B, V] (modified in place).

    `allowed[i]`, when given, is a boolean mask of the only tokens row i may produce (JSON mode).
    """
    logits = apply_penalties(logits, params, histories)
    for row, mask in enumerate(allowed or []):
        if mask is not None:
            logits[row].masked_fill_(~mask, -torch.inf)
    greedy_tokens = logits.argmax(dim=-1)
    if all(p.greedy for p in params):
        return greedy_tokens
    temperature = torch.tensor([1.0 if p.greedy else p.temperature for p in params])
    logits = logits / temperature.unsqueeze(1)
    top_k = min(max(p.top_k for p in params), logits.shape[1])
    if top_k:
        k = torch.tensor([min(p.top_k or logits.shape[1], logits.shape[1]) for p in params])
        sorted_desc = logits.topk(top_k, dim=-1).values
        kth = sorted_desc.gather(1, (k.clamp(max=sorted_desc.shape[1]) - 1).unsqueeze(1))
        kth = torch.where((k >= logits.shape[1]).unsqueeze(1), torch.full_like(kth, -torch.inf), kth)
        logits = logits.masked_fill(logits < kth, -torch.inf)
    probs = torch.softmax(logits, dim=-1)
    top_p = torch.tensor([p.top_p for p in params])
    if bool((top_p < 1).any()):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop = before > top_p.unsqueeze(1) * sorted_probs.sum(dim=-1, keepdim=True)
        probs = probs.scatter(1, order, sorted_probs.masked_fill(drop, 0.0))
    min_p = torch.tensor([p.min_p for p in params])
    if bool((min_p > 0).any()):
        threshold = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(1)
        probs = probs.masked_fill(probs < threshold, 0.0)
    return draw(probs, greedy_tokens, params, generators)


# SplitMix64 constants, as signed 64-bit integers (torch has no uint64 arithmetic).
_GOLDEN = 0x9E3779B97F4A7C15 - 2**64
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64
# The "head" of a distribution: tokens at least this fraction as likely as the most likely one.
HEAD = 1e-3


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _uniforms(key: int, tokens: torch.Tensor) -> torch.Tensor:
    """A uniform in (0, 1) for each token id, fixed by (key, token id): SplitMix64 of key + id."""
    x = key + (tokens + 1) * _GOLDEN
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    x = x ^ _shift_right(x, 31)
    return (_shift_right(x, 11).double() + 0.5) / 2.0**53


def draw(
    probs: torch.Tensor,
    greedy_tokens: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator],
) -> torch.Tensor:
    """Sample each non-greedy row exactly from `probs` (which need not sum to 1).

    Batched and solo runs differ in the last bits of their logits. Inverting the cumulative sum over
    49k tokens turns that noise into a different token now and then (every boundary moves with the sum
    of the errors before it), so a seeded request would depend on its batch. Here a token is chosen
    by an exponential race, the token maximising p / Exp(1), where each token's exponential comes from
    a hash of (a key drawn from the sequence's generator, the token id): a token's chance depends on
    its own probability, and the outcome changes only for tokens tied to within that noise.

    Racing all 49k tokens costs about a millisecond per row, so the race runs in two stages: a first
    uniform picks the head (tokens at least HEAD times as likely as the best) with the head's share of
    the mass, else the tail; then the race runs within the part picked. Both stages are exact, so the
    draw follows `probs`; the tail, rarely picked, pays the full race.
    """
    tokens = greedy_tokens.clone()
    for row, p in enumerate(params):
        if p.greedy:
            continue
        key = int(torch.randint(-(2**63), 2**63 - 1, (1,), generator=generators[row]))
        row_probs = probs[row]
        in_head = row_probs >= row_probs.max() * HEAD
        head_share = float(row_probs[in_head].double().sum() / row_probs.double().sum())
        first = float(_uniforms(key, torch.tensor([-1]))[0])  # id -1: a uniform no token uses
        part = in_head if first < head_share else (~in_head) & (row_probs > 0)
        candidates = part.nonzero().squeeze(1)
        scores = row_probs[candidates].double() / -torch.log(_uniforms(key, candidates))
        tokens[row] = candidates[scores.argmax()]
    return tokens


def top_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, k: int
) -> list[tuple[float, list[tuple[int, float]]]]:
    """The chosen token's log-probability and the `k` most likely alternatives, per row."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, tokens.unsqueeze(1)).squeeze(1)
    result = []
    if k:
        values, ids = logp.topk(k, dim=-1)
    for row in range(logits.shape[0]):
        alternatives = list(zip(ids[row].tolist(), values[row].tolist(), strict=True)) if k else []
        result.append((float(chosen[row]), alternatives))
    return result
