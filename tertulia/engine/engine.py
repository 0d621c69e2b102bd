"""The engine: prefill new prompts, then decode every running sequence in one batched forward.

`add` queues a request (n sequences sharing one prompt); each `step` admits waiting requests while
KV slots are free (prefilling the shared prompt once and copying it to the other n-1 slots), then
decodes one token for every running sequence. `generate` drives steps for a single request.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator

import torch

from tertulia import config as settings
from tertulia.engine import quant
from tertulia.engine.kv_cache import DecodeAttention, KVCache, PrefillAttention
from tertulia.engine.sampling import SamplingParams, sample, top_logprobs
from tertulia.engine.sequence import Sequence, Status, StepOutput, TokenLogprob
from tertulia.errors import PromptError
from tertulia.models.registry import LoadedModel

# Prompts are prefilled in chunks so attention scores stay small for long prompts.
PREFILL_CHUNK = 512


class Engine:
    def __init__(
        self,
        model: LoadedModel,
        *,
        max_batch: int = 16,
        max_context: int | None = None,
        quantization: str = "none",
    ) -> None:
        self.model = model
        self.tokenizer = model.tokenizer
        cache_file = None
        if model.weights_key and quantization == "int4":
            cache_file = (
                settings.cache_dir()
                / "quantized"
                / f"{model.weights_key}-int4-v{quant.FORMAT_VERSION}.safetensors"
            )
        self.quantization = quant.apply(model.module, quantization, cache_file)
        self.context = min(model.context_length, max_context or model.context_length)
        self.vocab_size = model.config.vocab_size
        self.stop_ids = self.tokenizer.end_of_turn_ids() | set(model.config.eos_ids)
        # CPU by default; a model moved to CUDA/MPS runs there (sampling stays on the CPU: it is
        # per-request Python logic over one row of logits per sequence).
        self.device = model.module.embed_tokens.weight.device
        self.cache = KVCache(model.config, max_batch, self.context, device=self.device)
        self.max_batch = max_batch
        self.waiting: deque[list[Sequence]] = deque()
        self.prefilling: list[Sequence] | None = None  # the group whose prompt is being prefilled
        self.prefilled = 0  # how many of its prompt tokens are in the cache
        self.running: list[Sequence] = []
        self._groups = itertools.count()

    # --- requests -----------------------------------------------------------------------------
    def check_prompt(self, prompt: list[int], params: SamplingParams) -> int:
        """Validate a request; return how many tokens it may generate."""
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
        try:
            params.validate(self.vocab_size)
        except ValueError as exc:
            raise PromptError(str(exc), code="invalid_value") from None
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
            )
            for i in range(params.n)
        ]
        self.waiting.append(sequences)
        return sequences

    def abort(self, sequences: list[Sequence]) -> None:
        """Stop sequences now (client gone, Stop pressed) and free their slots."""
        for seq in sequences:
            seq.abort()
        self.waiting = deque(g for g in self.waiting if any(s.status is Status.WAITING for s in g))
        self._release_finished()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

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
        if decoding:
            outputs += self._decode(decoding)
        self._release_finished()
        return outputs

    def _admit(self) -> bool:
        """Start prefilling the next waiting group if its slots are free."""
        while self.waiting and len(self.waiting[0]) <= self.cache.free_slots:
            group = [s for s in self.waiting.popleft() if s.status is Status.WAITING]
            if not group:
                continue
            for seq in group:
                seq.slot = self.cache.allocate()
            self.cache.reserve(len(group[0].prompt) + 1)
            self.prefilling, self.prefilled = group, 0
            return True
        return False

    def generate(self, prompt: list[int], params: SamplingParams) -> Iterator[StepOutput]:
        """Run one request to completion, yielding outputs as they are produced."""
        sequences = self.add(prompt, params)
        try:
            while any(s.status is not Status.FINISHED for s in sequences):
                for out in self.step():
                    if out.sequence in sequences:
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
        prompt = first.prompt
        chunk = prompt[start : start + PREFILL_CHUNK]
        hidden = self.model.module(
            torch.tensor(chunk, device=self.device),
            torch.arange(start, start + len(chunk), device=self.device),
            PrefillAttention(self.cache, first.slot, start, len(chunk)),
        )
        self.prefilled += len(chunk)
        if self.prefilled < len(prompt):
            return [], len(chunk)
        logits = self.model.module.compute_logits(hidden[-1:]).cpu()
        for seq in group[1:]:
            self.cache.copy_prefix(first.slot, seq.slot, len(prompt))
        self._end_prefill(group)
        alive = [s for s in group if s.status is Status.WAITING]
        for seq in alive:
            seq.status = Status.RUNNING
            self.running.append(seq)
        return self._sample(alive, logits.expand(len(alive), -1).clone()) if alive else [], len(chunk)

    def _end_prefill(self, group: list[Sequence]) -> None:
        """The group leaves the prefill stage; slots of its finished (aborted) members are freed."""
        self.prefilling = None
        for seq in group:
            if seq.status is Status.FINISHED and seq.slot is not None:
                self.cache.release(seq.slot)
                seq.slot = None

    def _decode(self, sequences: list[Sequence]) -> list[StepOutput]:
        sequences = [s for s in sequences if s.status is Status.RUNNING]
        if not sequences:
            return []
        positions = [s.length - 1 for s in sequences]
        self.cache.reserve(max(positions) + 2)
        hidden = self.model.module(
            torch.tensor([s.output[-1] for s in sequences], device=self.device),
            torch.tensor(positions, device=self.device),
            DecodeAttention(self.cache, [s.slot for s in sequences], positions),
        )
        outputs = self._sample(sequences, self.model.module.compute_logits(hidden).cpu())
        return outputs

    def _sample(self, sequences: list[Sequence], logits: torch.Tensor) -> list[StepOutput]:
        params = [s.params for s in sequences]
        want_logprobs = [p.logprobs is not None for p in params]
        raw = logits.clone() if any(want_logprobs) else None
        tokens = sample(logits, params, [s.history for s in sequences], [s.generator for s in sequences])
        token_list = tokens.tolist()
        logprob_rows = None
        if raw is not None:
            k = max(p.logprobs or 0 for p in params)
            logprob_rows = top_logprobs(raw, tokens, k)
        outputs = []
        for row, (seq, token) in enumerate(zip(sequences, token_list, strict=True)):
            text = seq.append(token, self.stop_ids, self.context)
            logprob = None
            if logprob_rows is not None and want_logprobs[row]:
                chosen, alternatives = logprob_rows[row]
                logprob = TokenLogprob(token, chosen, alternatives[: seq.params.logprobs or 0])
            outputs.append(StepOutput(seq, text, token, logprob))
        return outputs

    def _release_finished(self) -> None:
        still = []
        for seq in self.running:
            if seq.status is Status.FINISHED:
                if seq.slot is not None:
                    self.cache.release(seq.slot)
                    seq.slot = None
            else:
                still.append(seq)
        self.running = still
