"""The paged KV cache: one pool of key/value memory per layer, and where a sequence's positions live in it.

Keys and values live in one pool of positions per layer, [kv_heads, positions, head_dim], cut into
blocks (which block belongs to whom is blocks.py's business). A sequence's position p lives at pool
position table[p // B] * B + p % B. When a sequence's blocks happen to be consecutive (the usual case
for a lone stream) its positions are a slice of the pool; otherwise an index tensor.

The pool is allocated as lazily zeroed memory: the budget (`--kv-memory`) bounds it, but the process
only pays for the blocks it has written to. Every position therefore holds finite numbers, which
matters because decode attention reads (masked) positions past a sequence's end.

This module knows nothing of attention (attention.py) or of which sequences run (scheduler.py).
"""

from __future__ import annotations

import math
import mmap

import torch

from tertulia.engine.blocks import BLOCK_SIZE, BlockAllocator
from tertulia.models.config import ModelConfig


def bytes_per_position(config: ModelConfig, dtype: torch.dtype = torch.float32) -> int:
    """KV memory one token costs across all layers (keys and values)."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * element


def _lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    # An anonymous mapping: the kernel maps zero pages on first touch, so untouched blocks cost no
    # memory (torch.zeros would write, and so commit, the whole budget at start-up). In small pages:
    # a block's keys and values lie in one region per layer and head, and with 2 MB pages (numpy's
    # zeros asks for them) the first write to each region zeroed 2 MB, so a server's first request
    # paid ~1 s to write 180 of them.
    count = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    memory = mmap.mmap(-1, max(count, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        memory.madvise(mmap.MADV_NOHUGEPAGE)
    return torch.frombuffer(memory, dtype=torch.uint8, count=count).view(dtype).view(shape)


class KVCache:
    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.allocator = BlockAllocator(num_blocks)
        self.block_size = self.allocator.block_size
        self.positions = num_blocks * self.block_size
        self.device = torch.device(device)
        shape = (
            config.num_hidden_layers,
            2,
            config.num_key_value_heads,
            self.positions,
            config.head_dim,
        )
        self.storage = _lazy_zeros(shape, dtype, self.device)
        # Per-layer views in a Python list: indexing a list costs no tensor dispatch, and decode
        # indexes the cache twice per layer per token.
        self.keys = [self.storage[layer, 0] for layer in range(config.num_hidden_layers)]
        self.values = [self.storage[layer, 1] for layer in range(config.num_hidden_layers)]
        self.group = config.num_attention_heads // config.num_key_value_heads

    def locate(self, table: list[int], start: int, end: int) -> slice | torch.Tensor:
        """Pool positions of a sequence's positions start..end-1: a slice when they are consecutive."""
        size = self.block_size
        first, last = start // size, (end - 1) // size
        blocks = table[first : last + 1]
        offset = start - first * size
        if blocks[-1] - blocks[0] == len(blocks) - 1 and blocks == list(range(blocks[0], blocks[-1] + 1)):
            begin = blocks[0] * size + offset
            return slice(begin, begin + end - start)
        starts = torch.tensor(blocks, device=self.device).unsqueeze(1) * size
        every = (starts + torch.arange(size, device=self.device)).flatten()
        return every[offset : offset + end - start]

    def copy_block(self, source: int, target: int) -> None:
        """Give a sequence its own copy of a partly filled block (the n choices of one prompt)."""
        size = self.block_size
        self.storage[:, :, :, target * size : (target + 1) * size] = self.storage[
            :, :, :, source * size : (source + 1) * size
        ]


def one_sequence(config: ModelConfig, length: int) -> tuple[KVCache, list[int]]:
    """A cache for a single sequence of up to `length` positions, and its block table.

    For running the model outside the engine (perplexity, reference checks).
    """
    cache = KVCache(config, num_blocks=max(1, -(-length // BLOCK_SIZE)))
    return cache, list(range(cache.allocator.num_blocks))


def write_positions(pool: torch.Tensor, where: slice | torch.Tensor, rows: torch.Tensor) -> None:
    """Store rows [n, kv_heads, head_dim] of one layer's keys or values at pool positions `where`."""
    if isinstance(where, slice):
        pool[:, where] = rows.transpose(0, 1)
    else:
        pool.index_copy_(1, where, rows.transpose(0, 1))


def read_positions(pool: torch.Tensor, where: slice | torch.Tensor) -> torch.Tensor:
    """[kv_heads, n, head_dim]: one layer's keys or values at pool positions `where`."""
    return pool[:, where] if isinstance(where, slice) else pool.index_select(1, where)
