"""Which sequences run this step: the waiting queue, admission, block tables and preemption.

A request (n sequences sharing one prompt) waits until the batch and the KV memory budget have room
for it: the n choices share the prompt's blocks, and a prompt that starts like an earlier one reuses
its cached blocks. It is then prefilled in chunks (`prefilling`), and decodes (`running`) until it ends.

When decode needs a block and the budget is spent, the most recently admitted sequence is preempted:
its blocks are freed and it waits at the head of the queue, to be recomputed (prompt plus what it has
generated) when memory frees up. The alternative, reserving a request's whole maximum length up front,
would leave most of the budget idle.

The scheduler plans and keeps the books as it plans (by the time a plan is returned, admitted groups
hold their blocks, and a group whose prefill ends in it is running). It never touches tensors: the
model runner computes what a plan says, the sampler decides what the logits mean.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

from tertulia.engine.blocks import BlockAllocator, OutOfBlocks
from tertulia.engine.sequence import Sequence, Status

# Prompts are prefilled in chunks so attention scores stay small for long prompts. Chunks end at
# multiples of this, wherever prefill starts, so a request computes the same numbers whatever else is
# in flight (see attention.PrefillAttention).
PREFILL_CHUNK = 512


@dataclass(slots=True)
class PrefillChunk:
    """Prompt tokens at positions start..end-1 of one group, to compute into the blocks of `table`."""

    tokens: list[int]
    start: int
    table: list[int]
    # After the chunk: (source, target) blocks, each other choice's own copy of a partly filled last block.
    copies: list[tuple[int, int]] = field(default_factory=list)
    # The sequences that take their first token from the chunk's last row (none until the prompt ends,
    # nor for a preempted sequence being recomputed: its next token was already sampled).
    sample_for: list[Sequence] = field(default_factory=list)

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    @property
    def logit_rows(self) -> int:
        return len(self.sample_for)


@dataclass(slots=True)
class StepPlan:
    prefills: list[PrefillChunk]
    # The sequences that were running before this step's prefills: they decode after them.
    decode: list[Sequence]


@dataclass(slots=True)
class DecodeBatch:
    """One new token for each sequence: its last sampled token, at its last position."""

    sequences: list[Sequence]
    tokens: list[int]
    positions: list[int]
    tables: list[list[int]]


class Scheduler:
    def __init__(self, blocks: BlockAllocator, *, max_batch: int, prefix_cache: bool) -> None:
        self.blocks = blocks
        self.max_batch = max_batch
        self.prefix_cache = prefix_cache
        self.waiting: deque[list[Sequence]] = deque()
        self.prefilling: list[Sequence] | None = None  # the group whose prompt is being prefilled
        self.prefilled = 0  # how many of its prompt tokens are in the cache (or planned this step)
        self.running: list[Sequence] = []
        self.preemptions = 0
        self._admissions = itertools.count()

    # --- requests -----------------------------------------------------------------------------
    def add(self, group: list[Sequence]) -> None:
        self.waiting.append(group)

    def abort(self, sequences: list[Sequence]) -> None:
        """Stop sequences now and free their blocks (a prefilling group frees its own at its next chunk)."""
        for seq in sequences:
            seq.abort()
        self.waiting = deque(g for g in self.waiting if any(s.status is Status.WAITING for s in g))
        self.release_finished()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    @property
    def idle(self) -> bool:
        """No request in flight and no block held (cached prompt blocks do not count)."""
        return not self.has_work and self.blocks.used == 0

    def blocks_to_admit(self, length: int, n: int) -> int:
        """Blocks a group needs to start: its prompt once, plus its own last block for each other choice."""
        return self.blocks.blocks_for(length) + (n - 1 if length % self.blocks.block_size else 0)

    # --- planning -----------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """Prefill chunks worth up to PREFILL_CHUNK prompt tokens, admitting groups as they fit; then
        decode what was running before them."""
        decode = list(self.running)
        prefills: list[PrefillChunk] = []
        budget = PREFILL_CHUNK
        while budget > 0:
            if self.prefilling is None and not self._admit():
                break
            chunk = self._next_chunk()
            if chunk is not None:
                prefills.append(chunk)
                budget -= len(chunk.tokens)
        return StepPlan(prefills, decode)

    def decode_batch(self, sequences: list[Sequence]) -> DecodeBatch | None:
        """The still running `sequences`, each given the block its next position needs (preempting the
        newest admitted when memory is short); None when none is left."""
        sequences = self._grow([s for s in sequences if s.status is Status.RUNNING])
        if not sequences:
            return None
        return DecodeBatch(
            sequences,
            [s.output[-1] for s in sequences],
            [s.length - 1 for s in sequences],
            [s.blocks for s in sequences],
        )

    def release_finished(self) -> None:
        still = []
        for seq in self.running:
            if seq.status is Status.FINISHED:
                self._free(seq)
            else:
                still.append(seq)
        self.running = still

    # --- admission and prefill ----------------------------------------------------------------
    def _admit(self) -> bool:
        """Start prefilling the next waiting group if the batch and the KV budget have room for it."""
        while self.waiting:
            group = [s for s in self.waiting[0] if s.status is Status.WAITING]
            if not group:
                self.waiting.popleft()
                continue
            if len(self.running) + len(group) > self.max_batch:
                return False
            tokens = group[0].cached_tokens
            shared = self.blocks.lookup(tokens) if self.prefix_cache else []
            fresh = self.blocks_to_admit(len(tokens), len(group)) - len(shared)
            if fresh > self.blocks.available:
                self.blocks.release(shared)
                return False
            self.waiting.popleft()
            self.blocks.hits += len(shared)
            first = group[0]
            first.blocks = list(shared)
            while len(first.blocks) < self.blocks.blocks_for(len(tokens)):
                first.blocks.append(self.blocks.allocate(first.blocks[-1] if first.blocks else None))
            full = len(tokens) // self.blocks.block_size
            for seq in group[1:]:
                seq.blocks = [self.blocks.share(b) for b in first.blocks[:full]]
                if len(first.blocks) > full:
                    seq.blocks.append(self.blocks.allocate())
            for seq in group:
                seq.admitted = next(self._admissions)
            self.prefilling, self.prefilled = group, len(shared) * self.blocks.block_size
            return True
        return False

    def _next_chunk(self) -> PrefillChunk | None:
        """The prefilling group's next chunk; when it ends the prompt, the group starts running."""
        group = self.prefilling
        assert group is not None
        if all(s.status is Status.FINISHED for s in group):  # aborted while prefilling
            self._end_prefill(group)
            return None
        first, start = group[0], self.prefilled
        tokens = first.cached_tokens
        # Chunks end at multiples of PREFILL_CHUNK, wherever the prefix cache let prefill start.
        end = min(len(tokens), (start // PREFILL_CHUNK + 1) * PREFILL_CHUNK)
        chunk = PrefillChunk(tokens[start:end], start, first.blocks)
        self.prefilled = end
        if end < len(tokens):
            return chunk
        if self.prefix_cache:
            self.blocks.register(tokens, first.blocks)
        full = len(tokens) // self.blocks.block_size
        chunk.copies = [(first.blocks[full], s.blocks[full]) for s in group[1:] if len(s.blocks) > full]
        self._end_prefill(group)
        alive = [s for s in group if s.status is Status.WAITING]
        for seq in alive:
            seq.status = Status.RUNNING
            self.running.append(seq)
        if not first.output:
            chunk.sample_for = alive
        return chunk

    def _end_prefill(self, group: list[Sequence]) -> None:
        """The group leaves the prefill stage; blocks of its finished (aborted) members are freed."""
        self.prefilling = None
        for seq in group:
            if seq.status is Status.FINISHED:
                self._free(seq)

    # --- memory -------------------------------------------------------------------------------
    def _free(self, seq: Sequence) -> None:
        # Last block first: cached blocks become evictable in that order, so eviction (least recently
        # released first) takes a prompt's tail before its start, and the start stays findable.
        self.blocks.release(seq.blocks[::-1])
        seq.blocks = []

    def _grow(self, sequences: list[Sequence]) -> list[Sequence]:
        """Give each sequence the block its next position needs, preempting when memory is short."""
        for seq in sorted(sequences, key=lambda s: s.admitted):
            while seq.status is Status.RUNNING and self.blocks.blocks_for(seq.length) > len(seq.blocks):
                try:
                    seq.blocks.append(self.blocks.allocate(seq.blocks[-1]))
                except OutOfBlocks:
                    running = (s for s in self.running if s.status is Status.RUNNING)
                    self._preempt(max(running, key=lambda s: s.admitted))
        return [s for s in sequences if s.status is Status.RUNNING]

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks; it waits first in line, to be recomputed."""
        self._free(seq)
        self.running.remove(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft([seq])
        self.preemptions += 1
