"""The engine: prefill new prompts, then decode every running sequence in one batched forward.

`add` queues a request (n sequences sharing one prompt); each `step` admits waiting requests while
there is room in the batch and in the KV memory budget (the n choices share the prompt's blocks, and a
prompt that starts like an earlier one reuses its cached blocks), prefills, then decodes one token for
every running sequence. `generate` drives steps for a single request.

When decode needs a block and the budget is spent, the most recently admitted sequence is preempted:
its blocks are freed and it waits at the head of the queue, to be recomputed (prompt plus what it has
generated) when memory frees up. The alternative, reserving a request's whole maximum length up front,
would leave most of the budget idle.

A prefix-cache hit or a recomputation after preemption prefills from another start, but chunks end at
the same places and attention is computed so that a row's numbers do not depend on where its chunk
starts (kv_cache.PrefillAttention): the logits are a cold run's, bit for bit, on every CPU.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import deque
from collections.abc import Iterator

import torch

from tertulia import config as settings
from tertulia.engine import quant
from tertulia.engine.blocks import BLOCK_SIZE, OutOfBlocks
from tertulia.engine.json_mode import JsonConstraint, JsonGrammar
from tertulia.engine.kv_cache import DecodeAttention, KVCache, PrefillAttention, bytes_per_position
from tertulia.engine.sampling import SamplingParams, sample, top_logprobs
from tertulia.engine.sequence import Sequence, Status, StepOutput, TokenLogprob
from tertulia.errors import PromptError, TertuliaError
from tertulia.models.registry import LoadedModel

log = logging.getLogger(__name__)

# Prompts are prefilled in chunks so attention scores stay small for long prompts.
PREFILL_CHUNK = 512


def default_kv_memory(model: LoadedModel, max_batch: int, context: int) -> int:
    """Enough for every sequence at full context, but at most a quarter of the machine's memory."""
    wanted = max_batch * context * bytes_per_position(model.config)
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return wanted
    return min(wanted, physical // 4)


class Engine:
    def __init__(
        self,
        model: LoadedModel,
        *,
        max_batch: int = 16,
        max_context: int | None = None,
        quantization: str = "none",
        kv_memory: int | None = None,
        prefix_cache: bool = True,
    ) -> None:
        self.model = model
        self.tokenizer = model.tokenizer
        cache_file = None
        if model.weights_key and quantization == "int4":
            cache_file = quant.cache_file(settings.cache_dir() / "quantized", model.weights_key)
        self.quantization = quant.apply(model.module, quantization, cache_file)
        context = min(model.context_length, max_context or model.context_length)
        memory = kv_memory if kv_memory is not None else default_kv_memory(model, max_batch, context)
        block_bytes = bytes_per_position(model.config) * BLOCK_SIZE
        if memory < block_bytes * 2:
            raise TertuliaError(
                f"KV memory of {memory} bytes is too small for this model.",
                f"Give at least {2 * block_bytes} bytes (two blocks of 16 positions).",
            )
        # CPU by default; a model moved to CUDA/MPS runs there (sampling stays on the CPU: it is
        # per-request Python logic over one row of logits per sequence).
        self.device = model.module.embed_tokens.weight.device
        self.cache = KVCache(model.config, memory // block_bytes, device=self.device)
        self.blocks = self.cache.allocator
        # A sequence must fit in the budget on its own, so the budget also bounds the context.
        self.context = min(context, self.cache.positions)
        self.vocab_size = model.config.vocab_size
        self.stop_ids = self.tokenizer.end_of_turn_ids() | set(model.config.eos_ids)
        self.max_batch = max_batch
        self.prefix_cache = prefix_cache
        self.waiting: deque[list[Sequence]] = deque()
        self.prefilling: list[Sequence] | None = None  # the group whose prompt is being prefilled
        self.prefilled = 0  # how many of its prompt tokens are in the cache
        self.running: list[Sequence] = []
        self.preemptions = 0
        self._groups = itertools.count()
        self._admissions = itertools.count()
        self._json_grammar: JsonGrammar | None = None

    @property
    def json_grammar(self) -> JsonGrammar:
        """Built on the first JSON-mode request (sorting the vocabulary takes a moment)."""
        if self._json_grammar is None:
            self._json_grammar = JsonGrammar(self.tokenizer.token_bytes)
        return self._json_grammar

    # --- requests -----------------------------------------------------------------------------
    def check_prompt(self, prompt: list[int], params: SamplingParams) -> int:
        """Validate a request; return how many tokens it may generate."""
        try:
            params.validate(self.vocab_size)
        except ValueError as exc:
            raise PromptError(str(exc), code="invalid_value") from None
        if not prompt:
            raise PromptError("The prompt is empty.", "Write something to send.")
        if params.n > self.max_batch:
            raise PromptError(f"n={params.n} exceeds this engine's {self.max_batch} parallel sequences.")
        room = self.context - len(prompt)
        if room < 1 or (params.max_tokens is not None and params.max_tokens > room):
            wanted = params.max_tokens or 1
            raise PromptError(
                f"This model's context is {self.context} tokens; the prompt has {len(prompt)} and "
                f"{wanted} more were requested ({len(prompt) + wanted} in all).",
                "Shorten the conversation or ask for fewer tokens.",
                code="context_length_exceeded",
            )
        if self._blocks_to_admit(len(prompt), params.n) > self.blocks.num_blocks:
            raise PromptError(
                f"n={params.n} copies of a {len(prompt)}-token prompt do not fit in the KV memory budget.",
                "Ask for fewer choices, or start the server with more --kv-memory.",
            )
        return params.max_tokens or room

    def add(self, prompt: list[int], params: SamplingParams) -> list[Sequence]:
        max_tokens = self.check_prompt(prompt, params)
        group = next(self._groups)
        sequences = [
            Sequence(
                prompt=list(prompt),
                params=params,
                max_tokens=max_tokens,
                token_bytes=self.tokenizer.token_bytes,
                vocab_size=self.vocab_size,
                index=i,
                group=group,
                constraint=JsonConstraint(self.json_grammar) if params.json_object else None,
            )
            for i in range(params.n)
        ]
        self.waiting.append(sequences)
        return sequences

    def abort(self, sequences: list[Sequence]) -> None:
        """Stop sequences now (client gone, Stop pressed) and free their blocks."""
        for seq in sequences:
            seq.abort()
        self.waiting = deque(g for g in self.waiting if any(s.status is Status.WAITING for s in g))
        self._release_finished()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    @property
    def idle(self) -> bool:
        """No request in flight and no block held (cached prompt blocks do not count)."""
        return not self.has_work and self.blocks.used == 0

    # --- stepping -----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Prefill up to PREFILL_CHUNK prompt tokens (whole chunks), then decode every running sequence.

        A long prompt is prefilled over several steps, so the streams already running keep getting
        tokens meanwhile. Chunk boundaries are fixed per prompt (multiples of PREFILL_CHUNK), so a
        request computes the same numbers whatever else is in flight.
        """
        outputs: list[StepOutput] = []
        decoding = list(self.running)
        budget = PREFILL_CHUNK
        while budget > 0:
            if self.prefilling is None and not self._admit():
                break
            produced, used = self._prefill_chunk()
            outputs += produced
            budget -= used
        # Sequences that finished in their prefill free their blocks before decode may need them.
        self._release_finished()
        if decoding:
            outputs += self._decode(decoding)
        self._release_finished()
        return outputs

    def _blocks_to_admit(self, length: int, n: int) -> int:
        """Blocks a group needs to start: its prompt once, plus its own last block for each other choice."""
        return self.blocks.blocks_for(length) + (n - 1 if length % self.blocks.block_size else 0)

    def _admit(self) -> bool:
        """Start prefilling the next waiting group if the batch and the KV budget have room for it."""
        while self.waiting:
            group = [s for s in self.waiting[0] if s.status is Status.WAITING]
            if not group:
                self.waiting.popleft()
                continue
            if len(self.running) + len(group) > self.max_batch:
                return False
            tokens = group[0].cached_tokens
            shared = self.blocks.lookup(tokens) if self.prefix_cache else []
            fresh = self._blocks_to_admit(len(tokens), len(group)) - len(shared)
            if fresh > self.blocks.available:
                self.blocks.release(shared)
                return False
            self.waiting.popleft()
            self.blocks.hits += len(shared)
            first = group[0]
            first.blocks = list(shared)
            while len(first.blocks) < self.blocks.blocks_for(len(tokens)):
                first.blocks.append(self.blocks.allocate(first.blocks[-1] if first.blocks else None))
            full = len(tokens) // self.blocks.block_size
            for seq in group[1:]:
                seq.blocks = [self.blocks.share(b) for b in first.blocks[:full]]
                if len(first.blocks) > full:
                    seq.blocks.append(self.blocks.allocate())
            for seq in group:
                seq.admitted = next(self._admissions)
            self.prefilling, self.prefilled = group, len(shared) * self.blocks.block_size
            return True
        return False

    def generate(self, prompt: list[int], params: SamplingParams) -> Iterator[StepOutput]:
        """Run one request to completion, yielding outputs as they are produced."""
        sequences = self.add(prompt, params)
        try:
            while any(s.status is not Status.FINISHED for s in sequences):
                for out in self.step():
                    if out.sequence in sequences:
                        if out.sequence.error is not None:
                            raise out.sequence.error
                        yield out
        finally:
            self.abort(sequences)

    def _prefill_chunk(self) -> tuple[list[StepOutput], int]:
        """Run the prefilling group's next chunk; when its prompt is done, sample first tokens."""
        group = self.prefilling
        assert group is not None
        if all(s.status is Status.FINISHED for s in group):  # aborted while prefilling
            self._end_prefill(group)
            return [], 0
        first, start = group[0], self.prefilled
        tokens = first.cached_tokens
        # Chunks end at multiples of PREFILL_CHUNK, wherever the prefix cache let prefill start.
        end = min(len(tokens), (start // PREFILL_CHUNK + 1) * PREFILL_CHUNK)
        hidden = self.model.module(
            torch.tensor(tokens[start:end], device=self.device),
            torch.arange(start, end, device=self.device),
            PrefillAttention(self.cache, first.blocks, start, end - start),
        )
        self.prefilled = end
        if end < len(tokens):
            return [], end - start
        if self.prefix_cache:
            self.blocks.register(tokens, first.blocks)
        full = len(tokens) // self.blocks.block_size
        for seq in group[1:]:
            if len(seq.blocks) > full:
                self.cache.copy_block(first.blocks[full], seq.blocks[full])
        self._end_prefill(group)
        alive = [s for s in group if s.status is Status.WAITING]
        for seq in alive:
            seq.status = Status.RUNNING
            self.running.append(seq)
        if first.output:  # a preempted sequence, recomputed: its next token is already sampled
            return [], end - start
        logits = self.model.module.compute_logits(hidden[-1:]).cpu()
        return self._sample(alive, logits.expand(len(alive), -1).clone()) if alive else [], end - start

    def _end_prefill(self, group: list[Sequence]) -> None:
        """The group leaves the prefill stage; blocks of its finished (aborted) members are freed."""
        self.prefilling = None
        for seq in group:
            if seq.status is Status.FINISHED:
                self._free(seq)

    def _free(self, seq: Sequence) -> None:
        # Last block first: cached blocks become evictable in that order, so eviction (least recently
        # released first) takes a prompt's tail before its start, and the start stays findable.
        self.blocks.release(seq.blocks[::-1])
        seq.blocks = []

    def _grow(self, sequences: list[Sequence]) -> list[Sequence]:
        """Give each sequence the block its next position needs, preempting when memory is short."""
        for seq in sorted(sequences, key=lambda s: s.admitted):
            while seq.status is Status.RUNNING and self.blocks.blocks_for(seq.length) > len(seq.blocks):
                try:
                    seq.blocks.append(self.blocks.allocate(seq.blocks[-1]))
                except OutOfBlocks:
                    running = (s for s in self.running if s.status is Status.RUNNING)
                    self._preempt(max(running, key=lambda s: s.admitted))
        return [s for s in sequences if s.status is Status.RUNNING]

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks; it waits first in line, to be recomputed."""
        self._free(seq)
        self.running.remove(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft([seq])
        self.preemptions += 1

    def _decode(self, sequences: list[Sequence]) -> list[StepOutput]:
        sequences = self._grow([s for s in sequences if s.status is Status.RUNNING])
        if not sequences:
            return []
        positions = [s.length - 1 for s in sequences]
        hidden = self.model.module(
            torch.tensor([s.output[-1] for s in sequences], device=self.device),
            torch.tensor(positions, device=self.device),
            DecodeAttention(self.cache, [s.blocks for s in sequences], positions),
        )
        return self._sample(sequences, self.model.module.compute_logits(hidden).cpu())

    def _sample(self, sequences: list[Sequence], logits: torch.Tensor) -> list[StepOutput]:
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
        drawn = self._draw(sequences, logits, allowed)
        for seq, token, logprob in drawn:
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
    ) -> list[tuple[Sequence, int | Exception, TokenLogprob | None]]:
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
        drawn: list[tuple[Sequence, int | Exception, TokenLogprob | None]] = []
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

    def _release_finished(self) -> None:
        still = []
        for seq in self.running:
            if seq.status is Status.FINISHED:
                self._free(seq)
            else:
                still.append(seq)
        self.running = still
