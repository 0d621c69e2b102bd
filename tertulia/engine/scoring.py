"""How likely a model finds given texts: each continuation token's log-probability given what precedes it.

Evaluation's perplexity and multiple choice read this. It runs the same model code as serving
(quantized or not) on a KV cache of its own, so it never competes with requests for blocks. Requests
are packed several to a forward pass (each attends only to itself), longest first, which is what makes
scoring many short multiple-choice options fast. It knows nothing of documents, windows or metrics:
the caller decides what is context and what is scored.
"""

from __future__ import annotations

import torch

from tertulia.engine.attention import PrefillAttention, PrefillBatchAttention
from tertulia.engine.blocks import BLOCK_SIZE
from tertulia.engine.kv_cache import KVCache
from tertulia.models.llama import LlamaModel

# Tokens run through the model in one forward (several requests packed): enough rows that the
# matmuls run at full speed, few enough that activations stay small.
TOKENS_PER_FORWARD = 2048
# Logit rows computed at a time: [rows, vocab] floats, then reduced to one number per row.
LOGIT_ROWS = 512


def fitted(context: list[int], continuation: list[int], max_length: int) -> list[int]:
    """The tokens a request runs on: context then continuation, the oldest context dropped so that at
    most `max_length` tokens go in (the last token is only predicted)."""
    if not continuation:
        raise ValueError("a continuation to score needs at least one token")
    if len(continuation) > max_length:
        raise ValueError(f"a continuation of {len(continuation)} tokens does not fit {max_length}")
    if not context:
        raise ValueError("a continuation is scored after at least one context token")
    return (context + continuation)[-(max_length + 1) :]


@torch.inference_mode()
def continuation_logprobs(
    module: LlamaModel, requests: list[tuple[list[int], list[int]]], max_length: int
) -> list[list[float]]:
    """For each (context, continuation): log p(continuation[i] | context, continuation[:i]) for every i.

    A context longer than `max_length - len(continuation)` tokens loses its oldest tokens (as
    lm-evaluation-harness truncates). Results come back in the order of `requests`.
    """
    max_length = min(max_length, module.config.max_position_embeddings)
    tokens = [fitted(context, continuation, max_length) for context, continuation in requests]
    order = sorted(range(len(requests)), key=lambda i: -len(tokens[i]))
    budget = max(TOKENS_PER_FORWARD, max_length)
    # Every request of a forward rounds up to whole blocks: room for that too.
    cache = KVCache(module.config, num_blocks=-(-budget // BLOCK_SIZE) * 2)
    results: list[list[float]] = [[] for _ in requests]
    for batch in _packed(order, [len(t) - 1 for t in tokens], budget, cache.allocator.num_blocks):
        _score_batch(
            module,
            cache,
            [tokens[i] for i in batch],
            [len(requests[i][1]) for i in batch],
            [results[i] for i in batch],
        )
    return results


def _packed(order: list[int], lengths: list[int], budget: int, num_blocks: int) -> list[list[int]]:
    """Requests in `order`, cut into forwards of at most `budget` tokens and `num_blocks` blocks."""
    batches: list[list[int]] = [[]]
    tokens = blocks = 0
    for index in order:
        need = -(-lengths[index] // BLOCK_SIZE)
        if batches[-1] and (tokens + lengths[index] > budget or blocks + need > num_blocks):
            batches.append([])
            tokens = blocks = 0
        batches[-1].append(index)
        tokens += lengths[index]
        blocks += need
    return [batch for batch in batches if batch]


def _score_batch(
    module: LlamaModel,
    cache: KVCache,
    sequences: list[list[int]],
    scored: list[int],
    into: list[list[float]],
) -> None:
    """One forward over `sequences` (each its own blocks of `cache`); the last `scored[i]` tokens of
    sequence i are scored into `into[i]`."""
    parts, inputs, positions, rows, targets = [], [], [], [], []
    next_block, offset = 0, 0
    for sequence, count in zip(sequences, scored, strict=True):
        length = len(sequence) - 1
        blocks = -(-length // BLOCK_SIZE)
        parts.append(PrefillAttention(cache, list(range(next_block, next_block + blocks)), 0, length))
        next_block += blocks
        inputs += sequence[:-1]
        positions.append(torch.arange(length))
        # Row r predicts input token r + 1: the scored tokens are predicted by the last `count` rows.
        rows.append(torch.arange(offset + length - count, offset + length))
        targets += sequence[-count:]
        offset += length
    hidden = module(torch.tensor(inputs), torch.cat(positions), PrefillBatchAttention(parts))
    picked = hidden.index_select(0, torch.cat(rows))
    wanted = torch.tensor(targets)
    logprobs = torch.empty(len(targets))
    for first in range(0, len(targets), LOGIT_ROWS):
        last = min(len(targets), first + LOGIT_ROWS)
        logits = module.compute_logits(picked[first:last]).float()
        chosen = logits.gather(1, wanted[first:last].unsqueeze(1)).squeeze(1)
        logprobs[first:last] = chosen - torch.logsumexp(logits, dim=-1)
    values = logprobs.tolist()
    start = 0
    for count, target in zip(scored, into, strict=True):
        target.extend(values[start : start + count])
        start += count
