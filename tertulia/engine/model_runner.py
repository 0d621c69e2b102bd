"""Forward passes for a step's plan: a prompt chunk into the KV cache, and the batched decode.

Each returns logits rows on the CPU (where sampling runs). The runner knows nothing of queues,
sampling parameters or how sequences end: the scheduler says what to compute (token ids, positions,
block tables), the sampler what to make of the logits.
"""

from __future__ import annotations

import torch

from tertulia.engine import quant
from tertulia.engine.attention import DecodeAttention, PrefillAttention, PrefillBatchAttention
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
        self.rows_independent = quant.rows_independent(module)

    def prefill(self, chunks: list[PrefillChunk]) -> list[torch.Tensor | None]:
        """Compute chunks' keys and values into the cache. For each chunk sequences sample from: its
        last row's logits, one copy per sequence [logit_rows, V]; for the others None.

        Where the weights' kernels compute each row on its own (int4 layers, int8 head), all chunks go
        through one forward: a step admitting 16 short prompts runs the model once, not 16 times, with
        the numbers each chunk gets alone. Otherwise (float32 matmuls round a row differently with the
        row count), one forward per chunk.
        """
        if self.rows_independent and len(chunks) > 1:
            return self._prefill_together(chunks)
        return [self._prefill_together([chunk])[0] for chunk in chunks]

    def _prefill_together(self, chunks: list[PrefillChunk]) -> list[torch.Tensor | None]:
        attention = PrefillBatchAttention(
            [PrefillAttention(self.cache, c.table, c.start, len(c.tokens)) for c in chunks]
        )
        hidden = self.module(
            torch.tensor([t for c in chunks for t in c.tokens], device=self.device),
            torch.cat([torch.arange(c.start, c.end, device=self.device) for c in chunks]),
            attention,
        )
        for chunk in chunks:
            for source, target in chunk.copies:
                self.cache.copy_block(source, target)
        sampled = [i for i, c in enumerate(chunks) if c.logit_rows]
        if not sampled:
            return [None] * len(chunks)
        last_rows = torch.tensor([attention.bounds[i + 1] - 1 for i in sampled], device=self.device)
        logits = self.module.compute_logits(hidden.index_select(0, last_rows)).cpu()
        out: list[torch.Tensor | None] = [None] * len(chunks)
        for row, i in enumerate(sampled):
            out[i] = logits[row : row + 1].expand(chunks[i].logit_rows, -1).clone()
        return out

    def decode(self, batch: DecodeBatch) -> torch.Tensor:
        """One token for each sequence of the batch: logits [len(batch.sequences), V]."""
        forward = self.native or self.module
        hidden = forward(
            torch.tensor(batch.tokens, device=self.device),
            torch.tensor(batch.positions, device=self.device),
            DecodeAttention(self.cache, batch.tables, batch.positions),
        )
        return self.module.compute_logits(hidden).cpu()
