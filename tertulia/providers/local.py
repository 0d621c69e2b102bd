"""The local provider: a model loaded by `models.registry`, generating with Tertulia's own engine.

It is the only place where the reply contract meets the engine: `Options` become `SamplingParams`,
chat messages become token ids through the model's template, and the engine's step outputs become
`ReplyEvent`s. Served, the engine steps in a thread of its own (`start`, or `run_here` on the main
thread); made with `inline=True` (the terminal, evaluation) it steps in the reader's thread.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable

from tertulia import __version__
from tertulia.engine.async_engine import AsyncEngine, RequestStream
from tertulia.engine.engine import Engine
from tertulia.engine.quant import MODES, check_mode
from tertulia.engine.sampling import SamplingParams
from tertulia.engine.scoring import continuation_logprobs
from tertulia.engine.sequence import StepOutput
from tertulia.errors import PromptError
from tertulia.models import registry
from tertulia.models.gguf import Progress
from tertulia.models.registry import LoadedModel
from tertulia.providers.base import (
    Capability,
    EngineLoad,
    Message,
    Provider,
    Reply,
    ReplyEvent,
    ReplyObserver,
    ReplyRequest,
    TokenAlternative,
    TokenLogprob,
    Usage,
)
from tertulia.providers.options import Options

# Prompts encoded lately, by their messages: fitting a conversation counts its tokens, and the reply
# that follows would encode the same messages again.
ENCODED_KEPT = 16


def sampling_params(request: ReplyRequest) -> SamplingParams:
    """The engine's parameters for a request: each option's default filled in where it is unset."""
    options: Options = request.options
    return SamplingParams(
        temperature=1.0 if options.temperature is None else options.temperature,
        top_p=1.0 if options.top_p is None else options.top_p,
        top_k=options.top_k or 0,
        min_p=options.min_p or 0.0,
        frequency_penalty=options.frequency_penalty or 0.0,
        presence_penalty=options.presence_penalty or 0.0,
        repetition_penalty=options.repetition_penalty or 1.0,
        logit_bias={int(k): v for k, v in (options.logit_bias or {}).items()},
        seed=options.seed,
        max_tokens=options.max_tokens,
        stop=list(options.stop or []),
        n=request.n,
        logprobs=request.logprobs,
        json_object=request.json_object,
        ignore_eos=request.ignore_eos,
    )


# What --quantize accepts: the engine's modes, and "auto" (the weights' own precision decides).
QUANTIZATIONS = ("auto", *MODES)


def check_quantization(mode: str) -> None:
    """Refuse an unknown --quantize value before any weights load."""
    check_mode(mode, allow_auto=True)


class LocalProvider(Provider):
    capabilities = frozenset(
        {Capability.TOKENS, Capability.RAW_PROMPT, Capability.LOGPROBS, Capability.SCORE}
    )
    local = True

    def __init__(self, engine: Engine, *, inline: bool = False) -> None:
        self.engine = engine
        self.model = engine.model
        self.name = engine.model.name
        self.context_length = engine.context
        self.fingerprint = f"tertulia-{__version__}-{engine.quantization}"
        self.summary = f"{engine.quantization}, context {engine.context} tokens"
        self.driver = AsyncEngine(engine, inline=inline)
        # Set when the caller runs the engine loop itself (`run_here`), on the main thread.
        self.external_loop = False
        self._encoded: OrderedDict[str, list[int]] = OrderedDict()

    @classmethod
    def load(
        cls,
        spec: str | None = None,
        *,
        quantization: str = "auto",
        max_batch: int = 8,
        kv_memory: int | None = None,
        prefix_cache: bool = True,
        progress: Progress | None = None,
        inline: bool = False,
    ) -> LocalProvider:
        # The projection weights are read only if quantization needs them (not when the int4
        # weights come from their cache): a tenth of a second of every start.
        model = registry.load(spec, progress, defer_projections=quantization in ("auto", "int4"))
        return cls.of_model(
            model,
            quantization=registry.pick_quantization(model, quantization),
            max_batch=max_batch,
            kv_memory=kv_memory,
            prefix_cache=prefix_cache,
            inline=inline,
        )

    @classmethod
    def of_model(
        cls,
        model: LoadedModel,
        *,
        quantization: str = "none",
        max_batch: int = 8,
        kv_memory: int | None = None,
        prefix_cache: bool = True,
        inline: bool = False,
    ) -> LocalProvider:
        """A provider for a model already in memory (a fine-tune being judged, a test's tiny model)."""
        engine = Engine(
            model,
            quantization=quantization,
            max_batch=max_batch,
            kv_memory=kv_memory,
            prefix_cache=prefix_cache,
        )
        return cls(engine, inline=inline)

    # --- running --------------------------------------------------------------------------------
    def start(self) -> None:
        if not self.external_loop and not self.driver.inline:
            self.driver.start()

    def take_loop(self) -> Callable[[], None]:
        self.external_loop = True
        return self.driver.run_here

    def stop(self) -> None:
        self.driver.stop()

    @property
    def pending(self) -> int:
        return self.driver.pending

    def engine_load(self) -> EngineLoad:
        engine, blocks = self.engine, self.engine.blocks
        return EngineLoad(
            waiting=len(engine.waiting),
            running=len(engine.running),
            kv_used=blocks.used / blocks.num_blocks,
            prefix_hit_tokens=blocks.hits * blocks.block_size,
            preemptions=engine.preemptions,
        )

    def observe(self, observer: ReplyObserver) -> None:
        self.driver.observer = observer

    # --- tokens ---------------------------------------------------------------------------------
    def encode_chat(self, messages: list[Message]) -> list[int]:
        key = json.dumps(messages, ensure_ascii=False, sort_keys=True)
        ids = self._encoded.get(key)
        if ids is None:
            ids = self.model.template.encode(messages, add_generation_prompt=True)
            self._encoded[key] = ids
            while len(self._encoded) > ENCODED_KEPT:
                self._encoded.popitem(last=False)
        else:
            self._encoded.move_to_end(key)
        return list(ids)

    def encode_text(self, prompt: str | list[int]) -> list[int]:
        """A raw prompt's ids: the caller writes the format, so control tokens in it are honoured."""
        if isinstance(prompt, list):
            vocab = self.model.config.vocab_size
            if any(not 0 <= t < vocab for t in prompt):
                raise PromptError(
                    f"prompt token ids must be in 0..{vocab - 1}", code="invalid_value", param="prompt"
                )
            return prompt
        tokenizer = self.model.tokenizer
        ids = tokenizer.encode(prompt, allow_special=True)
        if tokenizer.add_bos and tokenizer.bos_id is not None and ids[:1] != [tokenizer.bos_id]:
            ids = [tokenizer.bos_id, *ids]
        return ids

    async def count_tokens(self, messages: list[Message]) -> int:
        return len(await asyncio.to_thread(self.encode_chat, messages))

    def token_bytes(self, token: int) -> bytes:
        tokenizer = self.model.tokenizer
        raw = tokenizer.token_bytes[token] if 0 <= token < len(tokenizer.token_bytes) else None
        return raw if raw is not None else (tokenizer.id_to_token(token) or "").encode()

    def decode(self, ids: list[int]) -> str:
        return self.model.tokenizer.decode(ids, skip_special=False)

    def encode(self, text: str) -> list[int]:
        return self.model.tokenizer.encode(text)

    def encode_conversation(self, messages: list[Message]) -> tuple[list[int], list[bool]]:
        ends = self.model.tokenizer.end_of_turn_ids() | set(self.model.config.eos_ids)
        return self.model.template.encode_marked(messages, ends)

    @property
    def document_start(self) -> int:
        tokenizer = self.model.tokenizer
        start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        if start is None:
            raise PromptError("This model's tokenizer has neither a beginning- nor an end-of-text token.")
        return start

    async def loglikelihoods(
        self, requests: list[tuple[list[int], list[int]]], max_length: int | None = None
    ) -> list[list[float]]:
        limit = self.model.config.max_position_embeddings
        length = min(max_length or limit, limit)
        if self.driver.inline:
            return continuation_logprobs(self.model.module, requests, length)
        return await asyncio.to_thread(continuation_logprobs, self.model.module, requests, length)

    # --- replies --------------------------------------------------------------------------------
    async def reply(self, request: ReplyRequest) -> Reply:
        """Template or encode (in a worker thread when served: a long prompt takes a while), check,
        and submit; every refusal raises here."""
        if request.messages is not None:
            encode, source = self.encode_chat, request.messages
        else:
            assert request.prompt is not None, "a reply needs messages or a prompt"
            encode, source = self.encode_text, request.prompt
        prompt = encode(source) if self.driver.inline else await asyncio.to_thread(encode, source)
        return LocalReply(self, self.driver.submit(prompt, sampling_params(request)))


class LocalReply(Reply):
    def __init__(self, provider: LocalProvider, stream: RequestStream) -> None:
        self.provider = provider
        self.stream = stream
        self.prompt_ids = stream.prompt
        self.usage = Usage(prompt_tokens=len(stream.prompt))

    def cancel(self) -> None:
        self.stream.cancel()

    def _logprob(self, out: StepOutput) -> TokenLogprob | None:
        item = out.logprob
        if item is None:
            return None
        raw = self.provider.token_bytes
        top = tuple(TokenAlternative(t, raw(t), lp) for t, lp in item.top)
        return TokenLogprob(item.token, raw(item.token), item.logprob, top)

    async def events(self) -> AsyncIterator[ReplyEvent]:
        ended: set[int] = set()
        try:
            async for out in self.stream:
                seq = out.sequence
                tokens = (out.token,) if out.token is not None else ()
                self.usage.produced(len(tokens))
                finish = seq.finish_reason if out.finished else None
                if finish is not None:
                    ended.add(seq.index)
                error = str(seq.error) if finish == "error" and seq.error is not None else None
                yield ReplyEvent(seq.index, out.text, tokens, self._logprob(out), finish, error)
        except Exception as exc:  # noqa: BLE001 - the engine failed this request: every open choice ends
            message = f"The model failed while generating ({type(exc).__name__}: {exc})."
            for index in range(len(self.stream.sequences) or self.stream.params.n):
                if index not in ended:
                    yield ReplyEvent(index, finish_reason="error", error=message)
        finally:
            self.stream.cancel()
