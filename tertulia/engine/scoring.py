"""How likely a model finds given texts: each continuation token's log-probability given what precedes it.

Evaluation's perplexity and multiple choice read this. It runs the same model code as serving
(quantized or not) but needs no KV cache: each forward sees whole sequences, so attention is one causal
SDPA call per sequence (PyTorch's flash kernel on the CPU, about twice as fast as reading a paged
cache row by row at 2,048 tokens), and scoring never competes with requests for cache blocks. Requests
are packed several to a forward (each attends only to itself), longest first, which is what makes
scoring many short multiple-choice options fast. Unlike serving, a request's numbers may differ in the
last bits with what shares its forward: no one samples from them.

It knows nothing of documents, windows or metrics: the caller decides what is context and what is
scored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
    results: list[list[float]] = [[] for _ in requests]
    for batch in _packed(order, [len(t) - 1 for t in tokens], budget):
        _score_batch(
            module,
            [tokens[i] for i in batch],
            [len(requests[i][1]) for i in batch],
            [results[i] for i in batch],
        )
    return results


def _packed(order: list[int], lengths: list[int], budget: int) -> list[list[int]]:
    """Requests in `order`, cut into forwards of at most `budget` tokens."""
    batches: list[list[int]] = [[]]
    tokens = 0
    for index in order:
        if batches[-1] and tokens + lengths[index] > budget:
            batches.append([])
            tokens = 0
        batches[-1].append(index)
        tokens += lengths[index]
    return [batch for batch in batches if batch]


class PackedCausalAttention:
    """Sequences laid end to end in one forward, each attending causally to itself only."""

    def __init__(self, lengths: list[int], group: int) -> None:
        self.bounds = [0]
        for length in lengths:
            self.bounds.append(self.bounds[-1] + length)
        self.group = group

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty(q.shape[0], q.shape[1] * q.shape[2], dtype=q.dtype)
        for first, last in zip(self.bounds, self.bounds[1:], strict=False):
            # [1, heads, length, dim]: the 4-D layout is what selects SDPA's flash kernel on the CPU.
            queries = q[first:last].transpose(0, 1).unsqueeze(0)
            keys = k[first:last].transpose(0, 1).repeat_interleave(self.group, 0).unsqueeze(0)
            values = v[first:last].transpose(0, 1).repeat_interleave(self.group, 0).unsqueeze(0)
            attended = F.scaled_dot_product_attention(queries, keys, values, is_causal=True)
            out[first:last] = attended[0].transpose(0, 1).reshape(last - first, -1)
        return out


def _score_batch(
    module: LlamaModel, sequences: list[list[int]], scored: list[int], into: list[list[float]]
) -> None:
    """One forward over `sequences`; the last `scored[i]` tokens of sequence i are scored into `into[i]`."""
    inputs, positions, rows, targets, lengths = [], [], [], [], []
    offset = 0
    for sequence, count in zip(sequences, scored, strict=True):
        length = len(sequence) - 1
        lengths.append(length)
        inputs += sequence[:-1]
        positions.append(torch.arange(length))
        # Row r predicts input token r + 1: the scored tokens are predicted by the last `count` rows.
        rows.append(torch.arange(offset + length - count, offset + length))
        targets += sequence[-count:]
        offset += length
    config = module.config
    attention = PackedCausalAttention(lengths, config.num_attention_heads // config.num_key_value_heads)
    hidden = module(torch.tensor(inputs), torch.cat(positions), attention)
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
