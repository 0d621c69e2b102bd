"""Scoring many (context, continuation) pairs packed into one forward gives each pair what a plain
full forward of that sequence alone gives."""

from __future__ import annotations

import torch

from tertulia.engine.attention import PrefillAttention
from tertulia.engine.kv_cache import one_sequence
from tertulia.engine.scoring import continuation_logprobs


def reference(module, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1, from one ordinary prefill of the whole sequence."""
    cache, table = one_sequence(module.config, len(ids))
    with torch.inference_mode():
        hidden = module(
            torch.tensor(ids[:-1]),
            torch.arange(len(ids) - 1),
            PrefillAttention(cache, table, 0, len(ids) - 1),
        )
        logits = torch.log_softmax(module.compute_logits(hidden).float(), dim=-1)
    return logits.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1).tolist()


def test_packed_pairs_score_as_alone(make_tiny_model) -> None:
    module = make_tiny_model().module
    generator = torch.Generator().manual_seed(3)
    sequences = [torch.randint(5, 2000, (n,), generator=generator).tolist() for n in (40, 3, 17, 90, 2)]
    requests = [(s[:-k], s[-k:]) for s, k in zip(sequences, (10, 2, 17 - 1, 1, 1), strict=True)]
    got = continuation_logprobs(module, requests, max_length=256)
    for (context, continuation), scores in zip(requests, got, strict=True):
        assert len(scores) == len(continuation)
        expected = reference(module, context + continuation)[-len(continuation) :]
        torch.testing.assert_close(torch.tensor(scores), torch.tensor(expected), rtol=1e-4, atol=1e-4)


def test_long_context_loses_its_oldest_tokens(make_tiny_model) -> None:
    module = make_tiny_model().module
    ids = list(range(100, 180))
    (scores,) = continuation_logprobs(module, [(ids[:-5], ids[-5:])], max_length=20)
    # At most 20 tokens go in: the 21 last tokens, the first of them context only.
    expected = reference(module, ids[-21:])[-5:]
    torch.testing.assert_close(torch.tensor(scores), torch.tensor(expected), rtol=1e-4, atol=1e-4)


def test_results_keep_request_order_across_forwards(make_tiny_model, monkeypatch) -> None:
    from tertulia.engine import scoring

    module = make_tiny_model().module
    monkeypatch.setattr(scoring, "TOKENS_PER_FORWARD", 16)  # several forwards, packed longest first
    requests = [([1] + list(range(200, 200 + n)), [7, 8]) for n in (3, 30, 9, 14, 1)]
    together = continuation_logprobs(module, requests, max_length=64)
    alone = [continuation_logprobs(module, [r], max_length=64)[0] for r in requests]
    torch.testing.assert_close(torch.tensor(together), torch.tensor(alone), rtol=1e-4, atol=1e-4)
