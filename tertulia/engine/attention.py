"""Attention over the paged KV cache: prefill of one sequence's chunk, and batched decode.

Each kernel is an `AttentionBackend` (models/llama.py): the model calls it once per layer with the new
tokens' q/k/v; it stores k/v in the cache (kv_cache.py) and attends over everything cached so far.

Both are written so that a row's numbers depend neither on what else shares the call (batch
invariance) nor on where a prefill chunk starts (prefix-cache hits and recomputation after preemption
give a cold run's logits, bit for bit). They know nothing of sequences, queues or sampling: only block
tables and positions.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F

from tertulia.engine import native
from tertulia.engine.kv_cache import KVCache, read_positions, write_positions

# Decode attention runs over a sequence's length rounded up to this many positions, masked. Sequences
# in the same bucket share one attention call; a lone sequence computes exactly the same thing, so
# what a request generates does not depend on what else is in the batch.
DECODE_BUCKET = 128


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v, as batched matmuls.

    Not F.scaled_dot_product_attention: its CPU kernel is not batch-invariant on every CPU (on AVX2
    machines a sequence's output changes with how many others share the call, by ~1e-7, which flips a
    near-tied greedy token a few dozen steps on). Each matrix of a batched matmul, and each row of a
    softmax, is computed on its own, so a sequence gets the same numbers alone or in a batch of 16.
    """
    scores = torch.matmul(q, k.transpose(-1, -2))
    scores.mul_(q.shape[-1] ** -0.5).add_(bias)
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def paged_attention_runs(cache: KVCache) -> bool:
    """Whether decode attention reads the pool in place here (csrc/decode_attention.cpp): the C++
    library built, a CPU with AVX2 and FMA, float32 pools on the CPU, head dims in multiples of 8."""
    keys = cache.keys[0]
    return cache.device.type == "cpu" and keys.dtype == torch.float32 and keys.shape[2] % 8 == 0 and _kernel()


@cache
def _kernel() -> bool:
    """Asked once per process: every decode step and prefill chunk asks whether the kernel runs."""
    return native.available() and bool(torch.ops.tertulia.paged_decode_attention_supported())


class _InPlace:
    """Rows of attention read in place by the kernel: row i is at position lengths[i] - 1 of its
    sequence. `tables` holds each sequence's block table once and `rows` how many rows in a row
    follow it (a prefill chunk's rows share one table), so the per-row tables are built by torch."""

    def __init__(self, cache: KVCache, tables: list[list[int]], rows: list[int], lengths: list[int]) -> None:
        width = max(-(-n // cache.block_size) for n in lengths)
        self.cache = cache
        distinct = torch.tensor([t[:width] + [0] * (width - len(t[:width])) for t in tables])
        self.tables = (
            distinct.repeat_interleave(torch.tensor(rows), dim=0) if len(rows) < len(lengths) else distinct
        )
        self.lengths = torch.tensor(lengths)

    def __call__(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        batch, heads, dim = q.shape
        out = torch.ops.tertulia.paged_decode_attention(
            q.contiguous(),
            self.cache.keys[layer],
            self.cache.values[layer],
            self.tables,
            self.lengths,
            self.cache.block_size,
        )
        return out.view(batch, heads * dim)


class PrefillAttention:
    """`length` new tokens of one sequence (block table `table`), at positions start..start+length-1.

    Each new token attends to positions 0..its own. Where `paged_attention_runs`, each row is read in
    place by the decode kernel as if it were a sequence ending at its position: its numbers depend on
    nothing but its position and the cache. Elsewhere, as two matmuls (attend) over the keys
    0..start+length-1 rather than SDPA: a row's numbers then depend only on where the chunk ends, not
    on where it starts. Chunks end at fixed places (scheduler.PREFILL_CHUNK), so either way a prompt
    prefilled after a prefix-cache hit gets exactly the numbers of a cold run, and a seeded request
    replays exactly.
    """

    ROWS_PER_CALL = 128  # bounds the scores tensor: heads x 128 x context floats
    # Matmuls of 1-3 rows take another CPU kernel, which rounds differently: a short chunk (what a
    # prefix-cache hit often leaves) is padded to this many rows, and the padding dropped.
    MIN_ROWS = 4

    def __init__(self, cache: KVCache, table: list[int], start: int, length: int) -> None:
        self.cache, self.start, self.end, self.table = cache, start, start + length, table
        self.written = cache.locate(table, start, self.end)
        self.in_place: _InPlace | None = None
        if paged_attention_runs(cache):
            self.in_place = _InPlace(cache, [table], [length], list(range(start + 1, self.end + 1)))
            return
        self.read = cache.locate(table, 0, self.end)
        device = cache.device
        rows = torch.arange(start, self.end, device=device).unsqueeze(1)
        visible = torch.arange(self.end, device=device).unsqueeze(0) <= rows
        self.bias = torch.zeros(visible.shape, device=device).masked_fill_(~visible, float("-inf"))

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        write_positions(keys, self.written, k)
        write_positions(values, self.written, v)
        if self.in_place is not None:
            return self.in_place(layer, q)
        length, heads, dim = q.shape
        kv_heads = keys.shape[0]
        # [kv_heads, group, length, dim] queries against [kv_heads, 1, end, dim] keys and values.
        grouped = q.view(length, kv_heads, heads // kv_heads, dim).permute(1, 2, 0, 3).contiguous()
        cached_keys = read_positions(keys, self.read).contiguous().unsqueeze(1)
        cached_values = read_positions(values, self.read).contiguous().unsqueeze(1)
        out = torch.empty_like(grouped)
        for first in range(0, length, self.ROWS_PER_CALL):
            rows = slice(first, min(length, first + self.ROWS_PER_CALL))
            queries, bias = grouped[:, :, rows], self.bias[rows]
            short = self.MIN_ROWS - queries.shape[2]
            if short > 0:
                queries, bias = F.pad(queries, (0, 0, 0, short)), F.pad(bias, (0, 0, 0, short))
            out[:, :, rows] = attend(queries, cached_keys, cached_values, bias)[:, :, : rows.stop - first]
        return out.permute(2, 0, 1, 3).reshape(length, heads * dim)


class PrefillBatchAttention:
    """Several chunks' tokens in one forward: each chunk attends alone (its PrefillAttention) to its rows.

    Only the matmuls outside attention see the rows together; with kernels whose rows do not depend on
    each other (see quant.rows_independent) every chunk gets the numbers it gets alone. Chunks are
    attended in order within each layer, so a chunk that reads blocks an earlier chunk of the same
    forward writes (a prompt sharing a prefix admitted this step) finds them written.
    """

    def __init__(self, parts: list[PrefillAttention]) -> None:
        self.parts = parts
        self.bounds = [0]
        for part in parts:
            self.bounds.append(self.bounds[-1] + part.end - part.start)
        # Read in place: every chunk's keys and values written first (one copy per layer), then all
        # rows attended in one call, each on its own (the same numbers as chunk by chunk).
        self.in_place: _InPlace | None = None
        if len(parts) > 1 and all(part.in_place is not None for part in parts):
            self.written = torch.cat([_positions(part.written) for part in parts])
            self.in_place = _InPlace(
                parts[0].cache,
                [part.table for part in parts],
                [part.end - part.start for part in parts],
                [n + 1 for part in parts for n in range(part.start, part.end)],
            )

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.in_place is not None:
            cache = self.parts[0].cache
            cache.keys[layer].index_copy_(1, self.written, k.transpose(0, 1))
            cache.values[layer].index_copy_(1, self.written, v.transpose(0, 1))
            return self.in_place(layer, q)
        if len(self.parts) == 1:
            return self.parts[0](layer, q, k, v)
        return torch.cat(
            [
                part(layer, q[first:last], k[first:last], v[first:last])
                for part, first, last in zip(self.parts, self.bounds, self.bounds[1:], strict=False)
            ]
        )


def _positions(where: slice | torch.Tensor) -> torch.Tensor:
    return torch.arange(where.start, where.stop) if isinstance(where, slice) else where


class _Bucket:
    """Sequences whose lengths round up to the same DECODE_BUCKET multiple: one attention call."""

    def __init__(
        self, cache: KVCache, span: int, rows: list[int], tables: list[list[int]], lengths: list[int]
    ):
        device = cache.device
        self.rows = torch.tensor(rows)
        self.span, self.count = span, len(rows)
        valid = torch.arange(span, device=device) < torch.tensor(lengths, device=device).unsqueeze(1)
        # Added to the scores: 0 where a position is the sequence's, -inf past its end.
        self.bias = torch.zeros(valid.shape, device=device).masked_fill_(~valid, float("-inf"))
        self.bias = self.bias.view(1, len(rows), 1, span)
        # Always gathered, even a lone sequence whose blocks are consecutive: a view of the pool in
        # place has other strides, and matmul kernels then round differently (see attend).
        parts = []
        for table, length in zip(tables, lengths, strict=True):
            where = cache.locate(table, 0, length)
            if isinstance(where, slice):
                where = torch.arange(where.start, where.stop, device=device)
            # Positions past the end read pool position 0 (masked, finite).
            parts.append(F.pad(where, (0, span - length)))
        # Rows of the pool seen as [kv_heads * positions, head_dim], every kv head's positions in turn:
        # one gather of whole rows, about twice as fast as gathering along the positions axis of
        # [kv_heads, positions, head_dim] once sixteen sequences share a bucket.
        heads = torch.arange(cache.keys[0].shape[0], device=device).unsqueeze(1) * cache.positions
        self.where = (heads + torch.cat(parts)).flatten()

    def read(self, pool: torch.Tensor) -> torch.Tensor:
        """[kv_heads, count, span, head_dim] keys or values: each [span, head_dim] matrix contiguous,
        laid out the same whatever `count` is."""
        gathered = pool.view(-1, pool.shape[2]).index_select(0, self.where)
        return gathered.view(pool.shape[0], self.count, self.span, pool.shape[2])


class DecodeAttention:
    """One new token for each of several sequences (block table `tables[i]`, at `positions[i]`).

    Where `paged_attention_runs`, each sequence attends over its own blocks in place (`tables`,
    `lengths`); elsewhere sequences are gathered into buckets of DECODE_BUCKET positions (`buckets`).
    Either way a sequence's numbers do not depend on the others in the step.
    """

    def __init__(self, cache: KVCache, tables: list[list[int]], positions: list[int]) -> None:
        self.cache = cache
        size = cache.block_size
        self.written = torch.tensor(
            [table[p // size] * size + p % size for table, p in zip(tables, positions, strict=True)],
            device=cache.device,
        )
        self.paged = paged_attention_runs(cache)
        self.buckets: list[_Bucket] = []
        if self.paged:
            self.in_place = _InPlace(cache, tables, [1] * len(tables), [p + 1 for p in positions])
            self.tables, self.lengths = self.in_place.tables, self.in_place.lengths
            return
        by_span: dict[int, list[int]] = {}
        for row, position in enumerate(positions):
            span = -(-(position + 1) // DECODE_BUCKET) * DECODE_BUCKET
            by_span.setdefault(span, []).append(row)
        self.buckets = [
            _Bucket(cache, span, rows, [tables[r] for r in rows], [positions[r] + 1 for r in rows])
            for span, rows in by_span.items()
        ]

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        keys.index_copy_(1, self.written, k.transpose(0, 1))
        values.index_copy_(1, self.written, v.transpose(0, 1))
        batch, heads, dim = q.shape
        if self.paged:
            return self.in_place(layer, q)
        # Grouped-query attention without copying k/v: the query heads that share a kv head become
        # the "query length" axis of that kv head. Batch axes are [kv_heads, sequences], the layout
        # the gathered keys and values come in (only the small queries are transposed).
        grouped = q.view(batch, heads // self.cache.group, self.cache.group, dim).transpose(0, 1).contiguous()
        if len(self.buckets) == 1:
            bucket = self.buckets[0]
            out = attend(grouped, bucket.read(keys), bucket.read(values), bucket.bias)
            return out.transpose(0, 1).reshape(batch, heads * dim)
        out = torch.empty_like(grouped)
        for bucket in self.buckets:
            out[:, bucket.rows] = attend(
                grouped[:, bucket.rows], bucket.read(keys), bucket.read(values), bucket.bias
            )
        return out.transpose(0, 1).reshape(batch, heads * dim)
