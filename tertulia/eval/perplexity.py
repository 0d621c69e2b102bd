"""Perplexity of a served model (through its own engine code, quantized or not) on token sequences."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from tertulia.engine.kv_cache import PrefillAttention, one_sequence
from tertulia.models.llama import LlamaModel


@torch.inference_mode()
def perplexity(module: LlamaModel, sequences: Iterable[list[int]], window: int = 1024) -> float:
    """exp(mean next-token negative log-likelihood) over all tokens of all sequences.

    Each sequence is scored in windows of `window` tokens (no overlap), so arbitrarily long texts fit.
    """
    config = module.config
    window = min(window, config.max_position_embeddings)
    cache, table = one_sequence(config, window)
    total_nll, total_tokens = 0.0, 0
    for ids in sequences:
        for start in range(0, len(ids) - 1, window):
            chunk = ids[start : start + window + 1]
            if len(chunk) < 2:
                continue
            inputs = torch.tensor(chunk[:-1])
            hidden = module(inputs, torch.arange(len(inputs)), PrefillAttention(cache, table, 0, len(inputs)))
            logits = module.compute_logits(hidden)
            total_nll += float(F.cross_entropy(logits, torch.tensor(chunk[1:]), reduction="sum"))
            total_tokens += len(chunk) - 1
    if not total_tokens:
        raise ValueError("no tokens to score")
    return math.exp(total_nll / total_tokens)
