"""A KV cache of fixed slots, and the attention that reads and writes it.

Each running sequence owns one slot: a [layers, kv_heads, length, head_dim] region for keys and
values. Prefill writes a run of positions of one slot; decode writes one position in each of several
slots and attends over each slot's own length (masked), in one batched call per layer.

Memory grows with use: the cache starts short and doubles its length (up to the model's context) when a
sequence needs more, so a chat that stays short never pays for an 8k-token context.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tertulia.models.config import ModelConfig


class KVCache:
    def __init__(
        self,
        config: ModelConfig,
        slots: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        # One tensor per layer (a Python list, not a [layers, ...] tensor): indexing a list costs no
        # tensor dispatch, and decode indexes the cache twice per layer per token.
        shape = (slots, config.num_key_value_heads, 0, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [
            torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)
        ]
        self.max_len = max_len
        self.reserve(min(max_len, 512))
        self.group = config.num_attention_heads // config.num_key_value_heads
        self._free = list(range(slots - 1, -1, -1))

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def reserve(self, length: int) -> None:
        """Make room for positions < `length` in every slot (zeros: masked reads stay finite)."""
        if length <= self.capacity:
            return
        if length > self.max_len:
            raise ValueError(f"KV cache holds at most {self.max_len} positions, {length} asked")
        new_len = min(self.max_len, max(length, 2 * self.capacity))
        for tensors in (self.keys, self.values):
            for layer, old in enumerate(tensors):
                grown = old.new_zeros(*old.shape[:2], new_len, old.shape[3])
                grown[:, :, : old.shape[2]] = old
                tensors[layer] = grown

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("KV cache has no free slot")
        # Lowest free slot first, so running slots stay dense and decode can slice instead of gather.
        self._free.sort(reverse=True)
        return self._free.pop()

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def copy_prefix(self, source: int, target: int, length: int) -> None:
        """Share a prompt: copy the first `length` positions of one slot into another."""
        for tensors in (self.keys, self.values):
            for layer in tensors:
                layer[target, :, :length] = layer[source, :, :length]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class PrefillAttention:
    """`length` new tokens of one sequence, at positions start..start+length-1."""

    def __init__(self, cache: KVCache, slot: int, start: int, length: int) -> None:
        self.cache, self.slot, self.start, self.end = cache, slot, start, start + length
        self.mask = None
        if start:
            device = cache.keys[0].device
            rows = torch.arange(start, self.end, device=device).unsqueeze(1)
            self.mask = torch.arange(self.end, device=device).unsqueeze(0) <= rows

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        keys = self.cache.keys[layer][self.slot]
        values = self.cache.values[layer][self.slot]
        keys[:, self.start : self.end] = k.transpose(0, 1)
        values[:, self.start : self.end] = v.transpose(0, 1)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),
            keys[:, : self.end].unsqueeze(0),
            values[:, : self.end].unsqueeze(0),
            attn_mask=self.mask,
            is_causal=self.mask is None,
            enable_gqa=True,
        )
        return out[0].transpose(0, 1).reshape(q.shape[0], -1)


class DecodeAttention:
    """One new token for each of several sequences (slot `slots[i]` at position `positions[i]`)."""

    def __init__(self, cache: KVCache, slots: list[int], positions: list[int]) -> None:
        self.cache = cache
        self.length = max(positions) + 1
        batch = len(slots)
        if slots == list(range(slots[0], slots[0] + batch)):
            self.slot_index: slice | torch.Tensor = slice(slots[0], slots[0] + batch)
        else:
            self.slot_index = torch.tensor(slots, device=cache.keys[0].device)
        self.slot_tensor = torch.tensor(slots, device=cache.keys[0].device)
        self.position_tensor = torch.tensor(positions, device=cache.keys[0].device)
        # Same position in contiguous slots (one sequence, or n choices of one prompt): a plain slice
        # write, cheaper than scattering by index.
        self.same_position = (
            positions[0] if isinstance(self.slot_index, slice) and min(positions) == max(positions) else None
        )
        # Sequences at different positions attend in groups of equal length, each over exactly its
        # own keys: one padded, masked call would sum in a different order and make a request's
        # tokens depend on what else shares the batch (float noise that flips sampled tokens).
        by_length: dict[int, list[int]] = {}
        for row, position in enumerate(positions):
            by_length.setdefault(position + 1, []).append(row)
        self.groups = None
        if len(by_length) > 1:
            self.groups = [
                (
                    length,
                    torch.tensor(rows),
                    torch.tensor([slots[r] for r in rows], device=cache.keys[0].device),
                )
                for length, rows in by_length.items()
            ]

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        if self.same_position is not None:
            keys[self.slot_index, :, self.same_position] = k
            values[self.slot_index, :, self.same_position] = v
        else:
            keys[self.slot_tensor, :, self.position_tensor] = k
            values[self.slot_tensor, :, self.position_tensor] = v
        batch, heads, dim = q.shape
        # Grouped-query attention without copying k/v: the query heads that share a kv head become
        # the "query length" axis of that kv head.
        grouped = q.view(batch, heads // self.cache.group, self.cache.group, dim)
        if self.groups is None:
            out = F.scaled_dot_product_attention(
                grouped, keys[self.slot_index, :, : self.length], values[self.slot_index, :, : self.length]
            )
            return out.reshape(batch, heads * dim)
        out = torch.empty_like(grouped)
        for length, rows, slots in self.groups:
            out[rows] = F.scaled_dot_product_attention(
                grouped[rows], keys[slots, :, :length], values[slots, :, :length]
            )
        return out.reshape(batch, heads * dim)
