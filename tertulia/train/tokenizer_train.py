"""`tertulia train tokenizer`: a byte-level BPE vocabulary learnt from a corpus, with chat tokens.

The tokenizer is the one the embedded model uses in kind (GPT-2-style byte-level BPE, so any text
encodes, no unknown token), with SmolLM2's special tokens in SmolLM2's places: `<|endoftext|>` (0)
separates documents, `<|im_start|>` (1) and `<|im_end|>` (2) frame chat turns in the ChatML template
the directory carries, so a model pretrained on it is chat-tuned and served with no conversion. It
learns only from the training split (`corpora`), and its compression is measured on the held-out one,
beside the default model's tokenizer on the same text.

This module knows nothing of models or of training loops.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from tertulia.errors import TertuliaError
from tertulia.models.tokenizer import Tokenizer
from tertulia.train.corpora import Corpus, documents
from tertulia.train.output import check_output, publish

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
DOCUMENT_SEPARATOR = SPECIAL_TOKENS[0]
BYTE_ALPHABET = 256
MAX_VOCAB = 2**17
# ChatML without a default system prompt: the turns exactly as the model is chat-tuned on them.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
FILES = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "report.md", "metrics.json"}
SAMPLE = "Hello! How are you doing today? I just got back from the library."


@dataclass
class Compression:
    """Held-out text's bytes per token: more is better (shorter sequences for the same text)."""

    held_out_bytes: int
    tokens: int
    default_tokens: int | None  # the embedded model's tokenizer on the same text

    @property
    def bytes_per_token(self) -> float:
        return self.held_out_bytes / max(self.tokens, 1)

    @property
    def default_bytes_per_token(self) -> float | None:
        return self.held_out_bytes / self.default_tokens if self.default_tokens else None


@dataclass
class TokenizerRun:
    corpora: list[str]
    vocab_size: int
    documents: int
    bytes: int
    seconds: float
    compression: Compression


def check_vocab_size(vocab_size: int) -> None:
    smallest = BYTE_ALPHABET + len(SPECIAL_TOKENS)
    if vocab_size < smallest:
        raise TertuliaError(
            f"--vocab-size {vocab_size} is smaller than the {BYTE_ALPHABET} byte tokens and "
            f"{len(SPECIAL_TOKENS)} special tokens every byte-level vocabulary holds.",
            f"Use at least {smallest} (a few thousand is usual for a small model).",
        )
    if vocab_size > MAX_VOCAB:
        raise TertuliaError(f"--vocab-size {vocab_size} is larger than {MAX_VOCAB}.")


def train_tokenizer(
    sources: list[Corpus],
    vocab_size: int,
    out: Path,
    *,
    force: bool = False,
    default_tokenizer: Callable[[], Tokenizer] | None = None,
) -> TokenizerRun:
    """Learn the vocabulary, measure it, and write `out` whole (nothing appears half-written)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    check_vocab_size(vocab_size)
    check_output(out, force=force, resume=False, files=FILES, what="a tokenizer")
    started = time.perf_counter()
    counted = {"documents": 0, "bytes": 0}

    def texts() -> Iterator[str]:
        for document in documents(sources, held_out=False):
            counted["documents"] += 1
            counted["bytes"] += len(document.text.encode("utf-8"))
            yield document.text

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts(), trainer=trainer)
    if counted["documents"] == 0:
        raise TertuliaError("The corpus holds no text to learn from (every document is empty or held out).")
    tokenizer = Tokenizer(backend, bos_token=DOCUMENT_SEPARATOR, eos_token=DOCUMENT_SEPARATOR)
    compression = measure(tokenizer, sources, default_tokenizer() if default_tokenizer else None)
    run = TokenizerRun(
        corpora=[s.name for s in sources],
        vocab_size=tokenizer.vocab_size,
        documents=counted["documents"],
        bytes=counted["bytes"],
        seconds=time.perf_counter() - started,
        compression=compression,
    )

    def write(staging: Path) -> None:
        tokenizer.save(staging, CHAT_TEMPLATE)
        (staging / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
        metrics = asdict(run) | {"bytes_per_token": compression.bytes_per_token}
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (staging / "report.md").write_text(report(run, tokenizer), encoding="utf-8")

    publish(out, write)
    return run


def measure(tokenizer: Tokenizer, sources: list[Corpus], default: Tokenizer | None) -> Compression:
    held_out = [d.text for d in documents(sources, held_out=True)]
    if not held_out:  # a corpus too small to hold any document out: measure on what it learnt from
        held_out = [d.text for d in documents(sources, held_out=False)]
    size = sum(len(t.encode("utf-8")) for t in held_out)
    tokens = sum(len(tokenizer.encode(t)) for t in held_out)
    default_tokens = sum(len(default.encode(t)) for t in held_out) if default else None
    return Compression(size, tokens, default_tokens)


def report(run: TokenizerRun, tokenizer: Tokenizer) -> str:
    compression = run.compression
    pieces = [tokenizer.decode([i], skip_special=False) for i in tokenizer.encode(SAMPLE)]
    lines = [
        "# Tokenizer",
        "",
        f"Byte-level BPE learnt from {', '.join(run.corpora)} in {run.seconds:.1f} s "
        f"(Python {platform.python_version()}, {platform.machine()}).",
        "",
        "| | |",
        "|---|---|",
        f"| vocabulary | {run.vocab_size} tokens ({', '.join(f'`{t}`' for t in SPECIAL_TOKENS)} first) |",
        f"| learnt from | {run.documents} documents, {run.bytes / 1e6:.2f} MB (the training split) |",
        f"| held-out text | {compression.held_out_bytes / 1e3:.1f} kB |",
        f"| bytes per token, held out | {compression.bytes_per_token:.2f} |",
    ]
    if compression.default_bytes_per_token is not None:
        lines.append(
            f"| the default model's tokenizer (49,152 tokens), same text | "
            f"{compression.default_bytes_per_token:.2f} |"
        )
    lines += [
        "",
        "More bytes per token means shorter sequences for the same text: cheaper training and a longer",
        "reach for the same context.",
        "",
        f"`{SAMPLE}` becomes {len(pieces)} tokens: " + " ".join(f"`{p}`" for p in pieces),
        "",
    ]
    return "\n".join(lines)
