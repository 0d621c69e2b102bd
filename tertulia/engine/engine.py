"""The engine: requests in, tokens out, one step at a time.

`add` queues a request (n sequences sharing one prompt); each `step` prefills prompt chunks of the
requests the scheduler admits, then decodes one token for every sequence that was running before
them, in one batched forward. `generate` drives steps for a single request.

A step is the same round twice, prefill then decode: the scheduler (scheduler.py) plans, the model
runner (model_runner.py) computes logits, the sampler (sampler.py) turns them into tokens. The decode
batch gets its blocks only after the prefills are sampled, so that a sequence that ended at its first
token has freed its blocks before decode may need them.

A prefix-cache hit or a recomputation after preemption prefills from another start, but chunks end at
the same places and attention is computed so that a row's numbers do not depend on where its chunk
starts (attention.PrefillAttention): the logits are a cold run's, bit for bit, on every CPU.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Iterator

import torch

from tertulia import config as settings
from tertulia.engine import quant
from tertulia.engine.blocks import BLOCK_SIZE
from tertulia.engine.json_mode import JsonConstraint, JsonGrammar
from tertulia.engine.kv_cache import KVCache, bytes_per_position
from tertulia.engine.model_runner import ModelRunner
from tertulia.engine.sampler import Sampler
from tertulia.engine.sampling import SamplingParams
from tertulia.engine.scheduler import DecodeBatch, PrefillChunk, Scheduler
from tertulia.engine.sequence import Sequence, Status, StepOutput
from tertulia.errors import PromptError, TertuliaError
from tertulia.models.registry import LoadedModel


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
        self.quantization = quant.apply(model.module, quantization, cache_file, model.load_deferred)
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
        self.scheduler = Scheduler(self.blocks, max_batch=max_batch, prefix_cache=prefix_cache)
        self.runner = ModelRunner(model.module, self.cache)
        self.sampler = Sampler(self.stop_ids, self.context)
        self._groups = itertools.count()
        self._json_grammar: JsonGrammar | None = None

    @property
    def json_grammar(self) -> JsonGrammar:
        """Built on the first JSON-mode request (sorting the vocabulary takes a moment)."""
        if self._json_grammar is None:
            self._json_grammar = JsonGrammar(self.tokenizer.token_bytes)
        return self._json_grammar

    # --- the scheduler's state, as the server's metrics and the tests read it ------------------
    @property
    def waiting(self) -> deque[list[Sequence]]:
        return self.scheduler.waiting

    @property
    def prefilling(self) -> list[Sequence] | None:
        return self.scheduler.prefilling

    @property
    def prefilled(self) -> int:
        return self.scheduler.prefilled

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

    @property
    def preemptions(self) -> int:
        return self.scheduler.preemptions

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    @property
    def idle(self) -> bool:
        """No request in flight and no block held (cached prompt blocks do not count)."""
        return self.scheduler.idle

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
        if self.scheduler.blocks_to_admit(len(prompt), params.n) > self.blocks.num_blocks:
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
        self.scheduler.add(sequences)
        return sequences

    def abort(self, sequences: list[Sequence]) -> None:
        """Stop sequences now (client gone, Stop pressed) and free their blocks."""
        self.scheduler.abort(sequences)

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

    # --- stepping -----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Prefill up to PREFILL_CHUNK prompt tokens (whole chunks), then decode every running sequence.

        A long prompt is prefilled over several steps, so the streams already running keep getting
        tokens meanwhile. Chunk boundaries are fixed per prompt (multiples of PREFILL_CHUNK), so a
        request computes the same numbers whatever else is in flight.
        """
        plan = self.scheduler.schedule()
        outputs = self._prefill(plan.prefills)
        # Sequences that finished at their first token free their blocks before decode may need them.
        self.scheduler.release_finished()
        outputs += self._decode(self.scheduler.decode_batch(plan.decode))
        self.scheduler.release_finished()
        return outputs

    def _prefill(self, chunks: list[PrefillChunk]) -> list[StepOutput]:
        outputs: list[StepOutput] = []
        for chunk, logits in zip(chunks, self.runner.prefill(chunks), strict=True):
            if logits is not None:
                outputs += self.sampler.sample(chunk.sample_for, logits)
        return outputs

    def _decode(self, batch: DecodeBatch | None) -> list[StepOutput]:
        if batch is None:
            return []
        return self.sampler.sample(batch.sequences, self.runner.decode(batch))
