"""From logits rows to each sequence's next token, one sequence's failure failing it alone.

For each sequence: its JSON-mode mask, a draw (batched; row by row if the batch fails), then the
sequence takes its token and decides whether it has ended. Whatever fails for one sequence (its mask,
its draw, its stop checks) fails that sequence, not its batch.

The arithmetic (penalties, temperature, top-k/p, min-p, the seeded draw, logprobs) is sampling.py's;
this module knows nothing of queues, blocks or the model.
"""

from __future__ import annotations

import logging

import torch

from tertulia.engine.sampling import sample, top_logprobs
from tertulia.engine.sequence import Sequence, StepOutput, TokenLogprob

log = logging.getLogger(__name__)

Drawn = tuple[Sequence, int | Exception, TokenLogprob | None]


class Sampler:
    def __init__(self, stop_ids: set[int], context: int) -> None:
        self.stop_ids = stop_ids
        self.context = context

    def sample(self, sequences: list[Sequence], logits: torch.Tensor) -> list[StepOutput]:
        """Next tokens for `sequences` (rows of `logits`): masks, draw, then each sequence takes its
        token. Whatever fails for one sequence (its mask, its draw, its stop checks) fails it alone."""
        outputs: list[StepOutput] = []
        rows, allowed = [], []
        for row, seq in enumerate(sequences):
            try:
                allowed.append(seq.constraint.mask(seq.tokens_left(self.context)) if seq.constraint else None)
                rows.append(row)
            except Exception as exc:  # noqa: BLE001 - isolate this sequence
                outputs.append(self._failed(seq, exc))
        if len(rows) < len(sequences):
            sequences, logits = [sequences[r] for r in rows], logits[rows]
        for seq, token, logprob in self._draw(sequences, logits, allowed):
            if isinstance(token, Exception):
                outputs.append(self._failed(seq, token))
                continue
            try:
                text = seq.append(token, self.stop_ids, self.context)
            except Exception as exc:  # noqa: BLE001
                outputs.append(self._failed(seq, exc))
                continue
            outputs.append(StepOutput(seq, text, token, logprob))
        return outputs

    def _draw(
        self, sequences: list[Sequence], logits: torch.Tensor, allowed: list[torch.Tensor | None]
    ) -> list[Drawn]:
        """Sample the batch at once; if that fails, row by row, so that only the culprit fails."""
        if not sequences:
            return []
        params = [s.params for s in sequences]
        # A draw advances each seeded row's generator: kept, so a retry row by row replays them.
        states = [s.generator.get_state() for s in sequences] if len(sequences) > 1 else []
        try:
            tokens = sample(
                logits.clone(),  # the penalties work in place: keep the logits for a retry
                params,
                [s.history for s in sequences],
                [s.generator for s in sequences],
                allowed if any(m is not None for m in allowed) else None,
            )
            logprob_rows = None
            if any(p.logprobs is not None for p in params):
                logprob_rows = top_logprobs(logits, tokens, max(p.logprobs or 0 for p in params))
        except Exception as exc:  # noqa: BLE001
            if len(sequences) == 1:
                return [(sequences[0], exc, None)]
            for seq, state in zip(sequences, states, strict=True):
                seq.generator.set_state(state)
            return [
                item
                for row in range(len(sequences))
                for item in self._draw(
                    sequences[row : row + 1], logits[row : row + 1], allowed[row : row + 1]
                )
            ]
        drawn: list[Drawn] = []
        for row, (seq, token) in enumerate(zip(sequences, tokens.tolist(), strict=True)):
            logprob = None
            if logprob_rows is not None and seq.params.logprobs is not None:
                chosen, alternatives = logprob_rows[row]
                logprob = TokenLogprob(token, chosen, alternatives[: seq.params.logprobs])
            drawn.append((seq, token, logprob))
        return drawn

    def _failed(self, seq: Sequence, error: Exception) -> StepOutput:
        log.exception("sequence %d.%d failed", seq.group, seq.index, exc_info=error)
        seq.fail(error)
        return StepOutput(seq, "", None)
