"""Perplexity of a served model (through its own engine code, quantized or not) on token sequences."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from tertulia.engine.kv_cache import PrefillAttention, one_sequence
from tertulia.models.llama import LlamaModel


@torch.inference_mode()
def perplexity(
    module: LlamaModel,
    sequences: Iterable[list[int]],
    window: int = 1024,
    scored: Iterable[list[bool]] | None = None,
) -> float:
    """exp(mean next-token negative log-likelihood) over all tokens of all sequences.

    Each sequence is scored in windows of `window` tokens (no overlap), so arbitrarily long texts fit.
    With `scored`, only the tokens marked True count (e.g. the assistant's turns of a conversation);
    the others are context.
    """
    marks = iter(scored) if scored is not None else None
    config = module.config
    window = min(window, config.max_position_embeddings)
    cache, table = one_sequence(config, window)
    total_nll, total_tokens = 0.0, 0
    for ids in sequences:
        keep = (
            torch.tensor(next(marks), dtype=torch.bool)
            if marks is not None
            else torch.ones(len(ids), dtype=torch.bool)
        )
        for start in range(0, len(ids) - 1, window):
            chunk = ids[start : start + window + 1]
            if len(chunk) < 2:
                continue
            inputs = torch.tensor(chunk[:-1])
            hidden = module(inputs, torch.arange(len(inputs)), PrefillAttention(cache, table, 0, len(inputs)))
            logits = module.compute_logits(hidden)
            counted = keep[start + 1 : start + len(chunk)]
            nll = F.cross_entropy(logits, torch.tensor(chunk[1:]), reduction="none")
            total_nll += float(nll[counted].sum())
            total_tokens += int(counted.sum())
    if not total_tokens:
        raise ValueError("no tokens to score")
    return math.exp(total_nll / total_tokens)
