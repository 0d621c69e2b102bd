"""Decode attention read in place from the paged pool (csrc/decode_attention.cpp): right numbers over
scattered blocks, a sequence's result independent of the batch and of threads, and clear errors."""

from __future__ import annotations

import pytest
import torch

from tertulia.engine import native
from tertulia.engine.attention import DecodeAttention, PrefillAttention
from tertulia.engine.kv_cache import KVCache
from tests.conftest import tiny_config
from tests.engine.threads import one_and_many_threads

BLOCK = 16
KV_HEADS, HEADS, DIM = 3, 9, 64
POOL_BLOCKS = 40

pytestmark = pytest.mark.skipif(
    not (native.available() and torch.ops.tertulia.paged_decode_attention_supported()),
    reason="decode attention in place needs the C++ library and a CPU with AVX2 and FMA",
)


def pools(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = (KV_HEADS, POOL_BLOCKS * BLOCK, DIM)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def reference(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, table: list[int], length: int
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v in float64, for one sequence."""
    rows = torch.tensor([table[j // BLOCK] * BLOCK + j % BLOCK for j in range(length)])
    k = keys[:, rows].double().repeat_interleave(HEADS // KV_HEADS, dim=0)  # [heads, length, dim]
    v = values[:, rows].double().repeat_interleave(HEADS // KV_HEADS, dim=0)
    scores = torch.einsum("hd,hld->hl", q.double(), k) / DIM**0.5
    return torch.einsum("hl,hld->hd", torch.softmax(scores, dim=-1), v).float()


def call(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tables: list[list[int]], lengths: list[int]
) -> torch.Tensor:
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    return torch.ops.tertulia.paged_decode_attention(q, keys, values, padded, torch.tensor(lengths), BLOCK)


TABLES = [[7], [3, 12, 5], [0, 1, 2, 3, 4, 5, 6, 8, 9, 10], [39, 20, 30, 11]]
LENGTHS = [1, 40, 151, 64]


def test_it_computes_softmax_attention_over_scattered_blocks() -> None:
    keys, values = pools()
    q = torch.randn(len(TABLES), HEADS, DIM) * 3  # sharp attention, so a wrong position shows
    out = call(q, keys, values, TABLES, LENGTHS)
    for i, (table, length) in enumerate(zip(TABLES, LENGTHS, strict=True)):
        torch.testing.assert_close(out[i], reference(q[i], keys, values, table, length), atol=2e-6, rtol=1e-5)


def test_a_sequences_result_does_not_depend_on_the_batch() -> None:
    keys, values = pools(1)
    q = torch.randn(len(TABLES), HEADS, DIM)
    together = call(q, keys, values, TABLES, LENGTHS)
    for i in range(len(TABLES)):
        alone = call(q[i : i + 1].contiguous(), keys, values, [TABLES[i]], [LENGTHS[i]])
        assert torch.equal(alone[0], together[i])
    reordered = call(q.flip(0).contiguous(), keys, values, TABLES[::-1], LENGTHS[::-1])
    assert torch.equal(reordered.flip(0), together)


def test_the_thread_count_does_not_change_the_result() -> None:
    keys, values = pools(2)
    q = torch.randn(len(TABLES), HEADS, DIM)
    alone, shared = one_and_many_threads(lambda: call(q, keys, values, TABLES, LENGTHS))
    assert torch.equal(alone, shared)


def test_extreme_scores_stay_finite() -> None:
    keys, values = pools(3)
    q = torch.full((1, HEADS, DIM), 1e3)  # scores in the tens of thousands: exp must not overflow
    out = call(q, keys, values, [TABLES[2]], [LENGTHS[2]])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(
        out[0], reference(q[0], keys, values, TABLES[2], LENGTHS[2]), atol=1e-4, rtol=1e-4
    )


def test_bad_input_is_refused_with_a_message() -> None:
    keys, values = pools()
    q = torch.randn(1, HEADS, DIM)
    with pytest.raises(RuntimeError, match="float32"):
        call(q.double(), keys, values, [[0]], [1])
    with pytest.raises(RuntimeError, match="length 17"):
        call(q, keys, values, [[0]], [17])
    with pytest.raises(RuntimeError, match="outside the pool"):
        call(q, keys, values, [[POOL_BLOCKS]], [1])
    with pytest.raises(RuntimeError, match="kv heads"):
        call(torch.randn(1, 8, DIM), keys, values, [[0]], [1])


def test_a_prefill_row_gets_what_a_decode_step_at_its_position_gets() -> None:
    """Read in place, a row's attention depends on nothing but its position and the cache: not on the
    chunk it came in, nor on where that chunk starts (prefix-cache hits rest on it)."""
    config = tiny_config(num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, hidden_size=HEADS * DIM)
    cache = KVCache(config, num_blocks=8)
    table, length = [5, 2, 7], 40
    generator = torch.Generator().manual_seed(4)
    q = torch.randn(length, HEADS, DIM, generator=generator)
    k, v = torch.randn(2, length, KV_HEADS, DIM, generator=generator)
    whole = PrefillAttention(cache, table, 0, length)(0, q, k, v)
    later = PrefillAttention(cache, table, 21, length - 21)(0, q[21:], k[21:], v[21:])
    assert torch.equal(later, whole[21:])
    for j in (0, 15, 16, 39):
        step = DecodeAttention(cache, [table], [j])(0, q[j : j + 1], k[j : j + 1], v[j : j + 1])
        assert torch.equal(step[0], whole[j])
