"""Tokenizers from GGUF metadata or tokenizer.json, with the byte view streaming decode needs.

Two encoders share one vocabulary: `encode(..., allow_special=True)` recognises control strings such as
`<|im_start|>` (used only for text the chat template produced), while the default treats them as plain
text, so user or model text can never forge a turn boundary.
"""

from __future__ import annotations

import json
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from tertulia.errors import ModelLoadError

# GGUF token types (llama.cpp's llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4

# Pre-tokenizer split patterns by GGUF `tokenizer.ggml.pre`, as the original tokenizers define them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Tokens that end a turn in common chat formats; generation stops on any that the vocabulary has.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "<|end_of_text|>", "</s>")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-character alphabet for the 256 byte values, inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes, strict=True)}


class Tokenizer:
    """Encode/decode plus the facts about special tokens that generation needs."""

    def __init__(
        self,
        backend: HFTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        add_bos: bool = False,
    ) -> None:
        self._special = backend
        # One backend serves both modes, switched by `encode_special_tokens` under a lock (a second
        # copy of the tokenizer would cost a noticeable share of start-up time).
        self._mode_lock = threading.Lock()
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.add_bos = add_bos
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        added = backend.get_added_tokens_decoder().items()
        self.special_ids = {tid for tid, tok in added if tok.special}
        # The control strings (`<|im_start|>`...), which only a chat template's own text may produce.
        self.special_texts = sorted({tok.content for _, tok in added if tok.special})
        self.bos_id = backend.token_to_id(bos_token) if bos_token else None
        self.eos_id = backend.token_to_id(eos_token) if eos_token else None
        self.token_bytes = self._token_bytes()

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_gguf_fields(cls, fields: dict[str, Any]) -> Tokenizer:
        kind = fields.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ModelLoadError(
                f"GGUF tokenizer '{kind}' is not supported (only byte-level BPE, 'gpt2').",
                "Convert the model to an HF directory (tokenizer.json) and load that instead.",
            )
        tokens: list[str] = fields.get("tokenizer.ggml.tokens") or []
        types: list[int] = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        if not tokens or len(types) != len(tokens):
            raise ModelLoadError(
                f"The GGUF tokenizer is incomplete ({len(tokens)} tokens, {len(types)} token types).",
                "The file may be corrupt.",
            )
        merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges", [])]
        vocab = {tok: i for i, tok in enumerate(tokens)}
        try:
            backend = HFTokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
        except Exception as exc:  # tokenizers raises a bare Exception, e.g. for a merge of unknown tokens
            raise ModelLoadError(
                f"The GGUF tokenizer is invalid: {exc}", "The file may be corrupt."
            ) from None
        backend.pre_tokenizer = _gguf_pre_tokenizer(fields.get("tokenizer.ggml.pre", "default"))
        backend.decoder = decoders.ByteLevel()
        added = [
            AddedToken(tok, special=(kind == _CONTROL), normalized=False)
            for tok, kind in zip(tokens, types, strict=True)
            if kind in (_CONTROL, _USER_DEFINED)
        ]
        backend.add_tokens(added)

        def token(key: str) -> str | None:
            tid = fields.get(f"tokenizer.ggml.{key}_token_id")
            return tokens[tid] if tid is not None and 0 <= tid < len(tokens) else None

        return cls(
            backend,
            bos_token=token("bos"),
            eos_token=token("eos"),
            add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
        )

    @classmethod
    def from_dir(cls, directory: Path) -> Tokenizer:
        path = directory / "tokenizer.json"
        if not path.exists():
            raise ModelLoadError(f"{directory} has no tokenizer.json.", "Save the tokenizer with the model.")
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers library raises a bare Exception on bad JSON
            raise ModelLoadError(f"{path} is not a valid tokenizer: {exc}") from None
        settings = read_tokenizer_config(directory)
        add_bos = bool(settings.get("add_bos_token", False))
        return cls(
            backend,
            bos_token=_token_text(settings.get("bos_token")),
            eos_token=_token_text(settings.get("eos_token")),
            add_bos=add_bos,
        )

    def save(self, directory: Path, chat_template: str | None) -> None:
        self._special.save(str(directory / "tokenizer.json"))
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "add_bos_token": self.add_bos,
            "model_max_length": 1_000_000,
        }
        if chat_template:
            config["chat_template"] = chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))

    # --- use ----------------------------------------------------------------------------------
    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Token ids of `text`; control strings count as special tokens only if `allow_special`."""
        # Lone surrogates (from undecodable input bytes) are not text the tokenizer accepts.
        text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        with self._mode_lock:
            self._special.encode_special_tokens = not allow_special
            return self._special.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], *, skip_special: bool = True) -> str:
        return self._special.decode(ids, skip_special_tokens=skip_special)

    def id_to_token(self, tid: int) -> str | None:
        return self._special.id_to_token(tid)

    def token_to_id(self, token: str) -> int | None:
        return self._special.token_to_id(token)

    def end_of_turn_ids(self) -> set[int]:
        """Ids that end generation: the EOS token and known end-of-turn control tokens."""
        ids = {self.eos_id} if self.eos_id is not None else set()
        for text in END_OF_TURN_TOKENS:
            tid = self._special.token_to_id(text)
            if tid is not None and tid in self.special_ids:
                ids.add(tid)
        return ids

    def _token_bytes(self) -> list[bytes | None]:
        """The exact bytes each token stands for (None for special tokens, which are not text)."""
        vocab_size = self.vocab_size
        table: list[bytes | None] = [None] * vocab_size
        decoder = self._special.decoder
        kinds = _decoder_kinds(json.loads(decoder.__getstate__())) if decoder is not None else set()
        byte_map = _byte_decoder()
        # str.translate maps a whole token in C; a token with a character outside the alphabet is
        # not byte-level text and keeps its UTF-8 bytes.
        alphabet = frozenset(byte_map)
        to_latin1 = {ord(ch): chr(b) for ch, b in byte_map.items()}
        added = self._special.get_added_tokens_decoder()
        for token, tid in self._special.get_vocab(with_added_tokens=True).items():
            if tid in self.special_ids or not 0 <= tid < vocab_size:
                continue
            if tid in added:
                table[tid] = token.encode()
            elif "ByteLevel" in kinds:
                if alphabet.issuperset(token):
                    table[tid] = token.translate(to_latin1).encode("latin-1")
                else:
                    table[tid] = token.encode()
            elif (
                "ByteFallback" in kinds
                and len(token) == 6
                and token.startswith("<0x")
                and token.endswith(">")
            ):
                table[tid] = bytes([int(token[3:5], 16)])
            elif "Metaspace" in kinds or "Replace" in kinds:
                table[tid] = token.replace("\u2581", " ").encode()
            else:
                table[tid] = self._special.decode([tid], skip_special_tokens=False).encode()
        return table


def read_tokenizer_config(directory: Path) -> dict[str, Any]:
    path = directory / "tokenizer_config.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON ({exc}).") from None


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _decoder_kinds(decoder: dict[str, Any]) -> set[str]:
    kinds = {decoder.get("type", "")}
    for child in decoder.get("decoders", []) or []:
        kinds |= _decoder_kinds(child)
    return kinds


def _gguf_pre_tokenizer(name: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if name == "smollm":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if name in ("llama-bpe", "llama3", "smaug-bpe"):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), "isolated"), byte_level])
    if name in ("qwen2", "deepseek-r1-qwen"):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_QWEN2_SPLIT), "isolated"), byte_level])
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
