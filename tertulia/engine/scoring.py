"""How likely a model finds a given text: each token's log-probability given the tokens before it.

Evaluation's perplexity and multiple choice read this. It runs the same model code as serving
(quantized or not) on a KV cache of its own, so it never competes with requests for blocks; it knows
nothing of datasets or metrics.
"""

from __future__ import annotations

import torch

from tertulia.engine.attention import PrefillAttention
from tertulia.engine.kv_cache import one_sequence
from tertulia.models.llama import LlamaModel


@torch.inference_mode()
def token_logprobs(module: LlamaModel, ids: list[int], window: int) -> list[float]:
    """log p(ids[i] | ids[start:i]) for i in 1..len(ids)-1, in windows of `window` predicted tokens
    with no overlap: each window starts fresh, so any length fits in a `window`-position cache."""
    window = min(window, module.config.max_position_embeddings)
    cache, table = one_sequence(module.config, window)
    scores: list[float] = []
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window + 1]
        inputs = torch.tensor(chunk[:-1])
        hidden = module(inputs, torch.arange(len(inputs)), PrefillAttention(cache, table, 0, len(inputs)))
        logits = module.compute_logits(hidden).float()
        picked = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(chunk[1:]).unsqueeze(1))
        scores += picked.squeeze(1).tolist()
    return scores
