"""Which KV-cache blocks belong to whom: reference counts, free blocks and the prefix cache.

The cache is cut into blocks of BLOCK_SIZE positions. A sequence holds a table of blocks; blocks full of
prompt are shared (the n choices of one request, and later requests whose prompt starts the same way:
a shared system prompt is computed once). A block whose last holder finished keeps its contents while
memory allows: it is "evictable", found again by its contents, and reused for new data only when no
free block is left (least recently used first).

Cached blocks are named by (the cached block before them, their tokens), never by a hash, so two
different prompts can never be taken for each other.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

BLOCK_SIZE = 16

_ROOT = 0  # the content id that precedes a prompt's first block


class OutOfBlocks(RuntimeError):
    """No free or evictable block is left (the engine preempts a sequence and retries)."""


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int = BLOCK_SIZE) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self._refs = [0] * num_blocks
        self._is_free = np.ones(num_blocks, dtype=bool)
        self._free_count = num_blocks
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._content_ids = itertools.count(_ROOT + 1)
        self._by_content: dict[tuple[int, tuple[int, ...]], int] = {}
        # block -> (its key in _by_content, its content id: the parent of the block after it)
        self._content: dict[int, tuple[tuple[int, tuple[int, ...]], int]] = {}
        self.hits = 0  # prompt blocks taken from the prefix cache (counted by the engine)

    # --- accounting ---------------------------------------------------------------------------
    @property
    def available(self) -> int:
        """Blocks that can be handed out now (free, or evictable cached contents)."""
        return self._free_count + len(self._evictable)

    @property
    def used(self) -> int:
        return self.num_blocks - self.available

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

    # --- handing out and taking back ----------------------------------------------------------
    def allocate(self, after: int | None = None) -> int:
        """A fresh block; the one right after `after` if it is free, so a sequence stays contiguous."""
        if after is not None and after + 1 < self.num_blocks and self._is_free[after + 1]:
            block = after + 1
        elif self._free_count:
            block = int(self._is_free.argmax())  # the lowest free block keeps used memory compact
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            self._forget(block)
            self._refs[block] = 1
            return block
        else:
            raise OutOfBlocks("the KV cache is full")
        self._is_free[block] = False
        self._free_count -= 1
        self._refs[block] = 1
        return block

    def share(self, block: int) -> int:
        """One more holder of a block (its contents are read, never written, by the new holder)."""
        if self._refs[block] == 0:
            self._evictable.pop(block, None)
        self._refs[block] += 1
        return block

    def release(self, blocks: Sequence[int]) -> None:
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block]:
                continue
            if block in self._content:
                self._evictable[block] = None
            else:
                self._is_free[block] = True
                self._free_count += 1

    # --- the prefix cache ---------------------------------------------------------------------
    def _chunks(self, tokens: Sequence[int], blocks: int) -> list[tuple[int, ...]]:
        size = self.block_size
        return [tuple(tokens[i * size : (i + 1) * size]) for i in range(blocks)]

    def lookup(self, tokens: Sequence[int]) -> list[int]:
        """Shared cached blocks for the longest cached prefix of `tokens`.

        At least one token is left out, so the caller still computes the last position's logits.
        """
        found: list[int] = []
        parent = _ROOT
        for chunk in self._chunks(tokens, (len(tokens) - 1) // self.block_size):
            block = self._by_content.get((parent, chunk))
            if block is None:
                break
            found.append(self.share(block))
            parent = self._content[block][1]
        return found

    def register(self, tokens: Sequence[int], blocks: Sequence[int]) -> None:
        """Make the full blocks of a computed prompt findable by later prompts that start the same."""
        parent = _ROOT
        for chunk, block in zip(self._chunks(tokens, len(tokens) // self.block_size), blocks, strict=False):
            key = (parent, chunk)
            known = self._by_content.get(key)
            if known is None:
                known = block
                self._by_content[key] = block
                self._content[block] = (key, next(self._content_ids))
            parent = self._content[known][1]

    def _forget(self, block: int) -> None:
        key, _ = self._content.pop(block)
        del self._by_content[key]
