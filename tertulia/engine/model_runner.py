"""Forward passes for a step's plan: a prompt chunk into the KV cache, and the batched decode.

Each returns logits rows on the CPU (where sampling runs). The runner knows nothing of queues,
sampling parameters or how sequences end: the scheduler says what to compute (token ids, positions,
block tables), the sampler what to make of the logits.
"""

from __future__ import annotations

import torch

from tertulia.engine.attention import DecodeAttention, PrefillAttention
from tertulia.engine.decode_stack import NativeDecode
from tertulia.engine.kv_cache import KVCache
from tertulia.engine.scheduler import DecodeBatch, PrefillChunk
from tertulia.models.llama import LlamaModel


class ModelRunner:
    def __init__(self, module: LlamaModel, cache: KVCache, native: bool = True) -> None:
        self.module = module
        self.cache = cache
        self.device = cache.device
        # The decode forward without the interpreter between ops, where the model allows it.
        self.native = NativeDecode.of(module, cache) if native else None

    def prefill(self, chunk: PrefillChunk) -> torch.Tensor | None:
        """Compute a chunk's keys and values into the cache. When sequences sample from it: its last
        row's logits, one copy per sequence [logit_rows, V]; else None."""
        hidden = self.module(
            torch.tensor(chunk.tokens, device=self.device),
            torch.arange(chunk.start, chunk.end, device=self.device),
            PrefillAttention(self.cache, chunk.table, chunk.start, len(chunk.tokens)),
        )
        for source, target in chunk.copies:
            self.cache.copy_block(source, target)
        if not chunk.logit_rows:
            return None
        logits = self.module.compute_logits(hidden[-1:]).cpu()
        return logits.expand(chunk.logit_rows, -1).clone()

    def decode(self, batch: DecodeBatch) -> torch.Tensor:
        """One token for each sequence of the batch: logits [len(batch.sequences), V]."""
        forward = self.native or self.module
        hidden = forward(
            torch.tensor(batch.tokens, device=self.device),
            torch.tensor(batch.positions, device=self.device),
            DecodeAttention(self.cache, batch.tables, batch.positions),
        )
        return self.module.compute_logits(hidden).cpu()
