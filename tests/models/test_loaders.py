"""Loading models: HF directories and GGUF files give the same network as transformers; bad input gives
a ModelLoadError with a message (never another exception); GGUF conversions are cached.

Tests marked slow build reference models with transformers; the rest use tiny files written here.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType
from safetensors.torch import save_file

from tertulia.engine.attention import DecodeAttention, PrefillAttention
from tertulia.engine.kv_cache import KVCache, one_sequence
from tertulia.errors import ModelLoadError
from tertulia.models import registry
from tertulia.models.llama import interleave_rotary
from tertulia.models.registry import LoadedModel

REPO = Path(__file__).resolve().parents[2]

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, CONTEXT = 64, 128, 2, 4, 2, 256
HEAD_DIM = HIDDEN // HEADS
FULL_VOCAB = 49152

# HF name (after "model.layers.N.") -> GGUF name (after "blk.N."), as llama.cpp's converter writes them.
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


# --- helpers: random checkpoints --------------------------------------------------------------------


def tiny_state(
    *,
    vocab: int,
    tied: bool = True,
    bias: bool = False,
    seed: int = 0,
    heads: int = HEADS,
    kv_heads: int = KV_HEADS,
) -> dict[str, torch.Tensor]:
    """HF-named random weights for a 2-layer Llama-family model, scaled so logits are far from flat."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, std: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    state = {"model.embed_tokens.weight": rand(vocab, HIDDEN, std=0.5), "model.norm.weight": 1 + rand(HIDDEN)}
    if not tied:
        state["lm_head.weight"] = rand(vocab, HIDDEN)
    head_dim = HIDDEN // heads
    q_rows, kv_rows = heads * head_dim, kv_heads * head_dim
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = 1 + rand(HIDDEN, std=0.1)
        state[p + "post_attention_layernorm.weight"] = 1 + rand(HIDDEN, std=0.1)
        state[p + "self_attn.q_proj.weight"] = rand(q_rows, HIDDEN)
        state[p + "self_attn.k_proj.weight"] = rand(kv_rows, HIDDEN)
        state[p + "self_attn.v_proj.weight"] = rand(kv_rows, HIDDEN)
        state[p + "self_attn.o_proj.weight"] = rand(HIDDEN, q_rows)
        state[p + "mlp.gate_proj.weight"] = rand(FFN, HIDDEN)
        state[p + "mlp.up_proj.weight"] = rand(FFN, HIDDEN)
        state[p + "mlp.down_proj.weight"] = rand(HIDDEN, FFN)
        if bias:
            state[p + "self_attn.q_proj.bias"] = rand(q_rows, std=0.5)
            state[p + "self_attn.k_proj.bias"] = rand(kv_rows, std=0.5)
            state[p + "self_attn.v_proj.bias"] = rand(kv_rows, std=0.5)
    return state


def hf_config_dict(model_type: str = "llama", *, vocab: int, tied: bool = True) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": CONTEXT,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tied,
        "eos_token_id": 2,
    }


def write_hf_dir(
    directory: Path, state: dict[str, torch.Tensor], config: dict[str, Any], tokenizer_dir: Path
) -> Path:
    """An HF-format directory written without transformers (as a training script would)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    copy_tokenizer(tokenizer_dir, directory)
    return directory


def copy_tokenizer(source: Path, directory: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, directory / name)


def prefill_logits(model: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    """Logits at every position of `ids`, through the serving path (KV cache + prefill attention)."""
    cache, table = one_sequence(model.config, len(ids))
    hidden = model.module(ids, torch.arange(len(ids)), PrefillAttention(cache, table, 0, len(ids)))
    return model.module.compute_logits(hidden)


# --- helpers: GGUF files ----------------------------------------------------------------------------


def _byte_alphabet() -> list[str]:
    """GPT-2's 256 printable stand-ins for bytes: the base vocabulary of any byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def small_tokenizer_fields() -> dict[str, Any]:
    """A 262-token byte-level BPE vocabulary: enough to load and encode, cheap to write and read."""
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *_byte_alphabet(), "Ġt", "he", "Ġthe"]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 3, 3] + [1] * (len(tokens) - 3),
        "tokenizer.ggml.merges": ["Ġ t", "h e", "Ġt he"],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}",
    }


def write_gguf(
    path: Path,
    state: dict[str, torch.Tensor],
    tokenizer_fields: dict[str, Any],
    *,
    arch: str = "llama",
    quant: Callable[[str], QType | None] = lambda name: None,
    raw: dict[str, tuple[np.ndarray, QType]] | None = None,
    skip: frozenset[str] = frozenset(),
    extra: dict[str, np.ndarray] | None = None,
    heads: int = HEADS,
    kv_heads: int = KV_HEADS,
    rope_theta: float = 10000.0,
    vocab_size: int | None = None,
) -> Path:
    """A GGUF file laid out like llama.cpp's converter output (rotary rows permuted for 'llama')."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(rope_theta)
    if vocab_size is not None:
        writer.add_vocab_size(vocab_size)
    writer.add_tokenizer_model(tokenizer_fields["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(tokenizer_fields["tokenizer.ggml.pre"])
    writer.add_token_list(tokenizer_fields["tokenizer.ggml.tokens"])
    writer.add_token_types(tokenizer_fields["tokenizer.ggml.token_type"])
    writer.add_token_merges(tokenizer_fields["tokenizer.ggml.merges"])
    writer.add_bos_token_id(tokenizer_fields["tokenizer.ggml.bos_token_id"])
    writer.add_eos_token_id(tokenizer_fields["tokenizer.ggml.eos_token_id"])
    writer.add_chat_template(tokenizer_fields["tokenizer.chat_template"])
    for hf_name, tensor in state.items():
        if hf_name in _GLOBAL_NAMES:
            name = _GLOBAL_NAMES[hf_name]
        else:
            _, _, index, rest = hf_name.split(".", 3)
            name = f"blk.{index}.{_LAYER_NAMES[rest]}"
        if name in skip:
            continue
        if raw and name in raw:
            data, qtype = raw[name]
            writer.add_tensor(name, data, raw_dtype=qtype)
            continue
        if arch == "llama" and ".attn_q." in name:
            tensor = interleave_rotary(tensor, heads)
        elif arch == "llama" and ".attn_k." in name:
            tensor = interleave_rotary(tensor, kv_heads)
        array = tensor.numpy().astype(np.float32)
        qtype = quant(name)
        if qtype is None:
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    for name, array in (extra or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def quantized_copy(state: dict[str, torch.Tensor], qtype: QType, names: set[str]) -> dict[str, torch.Tensor]:
    """What a GGUF reader recovers for `names` after `qtype` quantization (rows are quantized
    independently, so this commutes with the rotary row permutation)."""
    out = dict(state)
    for name in names:
        array = state[name].numpy().astype(np.float32)
        out[name] = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(array, qtype), qtype).copy())
    return out


def is_2d_layer_weight(name: str) -> bool:
    return name.startswith("blk.") and not name.endswith("norm.weight") and name.endswith(".weight")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private TERTULIA_HOME, so conversions of throwaway GGUF files do not pile up in the shared cache."""
    path = tmp_path / "home"
    monkeypatch.setenv("TERTULIA_HOME", str(path))
    return path


@pytest.fixture(scope="module")
def real_tokenizer_fields(embedded_gguf: Path) -> dict[str, Any]:
    """The embedded model's tokenizer metadata, read with the gguf library itself."""
    reader = gguf.GGUFReader(str(embedded_gguf))
    keys = [
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.chat_template",
    ]
    return {key: reader.fields[key].contents() for key in keys}


# --- (a) HF directories against transformers ------------------------------------------------------


@pytest.fixture(scope="module")
def transformers_module() -> Any:
    return pytest.importorskip("transformers")


def hf_reference(
    transformers: Any,
    model_type: str,
    state: dict[str, torch.Tensor],
    tied: bool,
    *,
    heads: int = HEADS,
    kv_heads: int = KV_HEADS,
    **overrides: Any,
) -> Any:
    """A transformers model of the given family holding exactly `state`."""
    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }
    config_cls, model_cls = classes[model_type]
    config = config_cls(
        vocab_size=state["model.embed_tokens.weight"].shape[0],
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=CONTEXT,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        **overrides,
    )
    torch.manual_seed(0)
    model = model_cls(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected
    assert set(missing) <= ({"lm_head.weight"} if tied else set())
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model.eval()


def hf_logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids.unsqueeze(0)).logits[0].float()


FAMILIES = [
    pytest.param("llama", True, False, id="llama-tied"),
    pytest.param("qwen2", False, True, id="qwen2-bias-untied"),
    pytest.param("mistral", False, False, id="mistral-untied"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("model_type", "tied", "bias"), FAMILIES)
def test_hf_directory_matches_transformers(
    model_type: str, tied: bool, bias: bool, transformers_module: Any, embedded_dir: Path, tmp_path: Path
) -> None:
    state = tiny_state(vocab=FULL_VOCAB, tied=tied, bias=bias, seed=1)
    reference = hf_reference(transformers_module, model_type, state, tied)
    reference.save_pretrained(tmp_path, safe_serialization=True)
    copy_tokenizer(embedded_dir, tmp_path)

    loaded = registry.load(str(tmp_path))
    assert loaded.config.model_type == model_type
    assert loaded.config.attention_bias is bias
    assert loaded.config.tie_word_embeddings is tied
    assert loaded.source_quantization == {}

    ids = torch.randint(0, FULL_VOCAB, (24,), generator=torch.Generator().manual_seed(5))
    ours, theirs = prefill_logits(loaded, ids), hf_logits(reference, ids)
    assert theirs.abs().max() > 1.0  # not a degenerate comparison of near-zero logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_decode_after_prefill_matches_transformers(
    transformers_module: Any, embedded_dir: Path, tmp_path: Path
) -> None:
    """Qwen2 (biases, untied): prefill half a sequence, decode the rest one token at a time."""
    state = tiny_state(vocab=FULL_VOCAB, tied=False, bias=True, seed=2)
    reference = hf_reference(transformers_module, "qwen2", state, tied=False)
    reference.save_pretrained(tmp_path, safe_serialization=True)
    copy_tokenizer(embedded_dir, tmp_path)
    loaded = registry.load(str(tmp_path))

    ids = torch.randint(0, FULL_VOCAB, (20,), generator=torch.Generator().manual_seed(6))
    theirs = hf_logits(reference, ids)
    cache = KVCache(loaded.config, num_blocks=4)
    table = [3, 1]  # scattered blocks: decode must read exactly this sequence's positions
    module, split = loaded.module, 8
    hidden = module(ids[:split], torch.arange(split), PrefillAttention(cache, table, 0, split))
    rows = [module.compute_logits(hidden)]
    for pos in range(split, len(ids)):
        hidden = module(ids[pos : pos + 1], torch.tensor([pos]), DecodeAttention(cache, [table], [pos]))
        rows.append(module.compute_logits(hidden))
    torch.testing.assert_close(torch.cat(rows), theirs, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoint_loads(
    dtype: torch.dtype, transformers_module: Any, embedded_dir: Path, tmp_path: Path
) -> None:
    state = tiny_state(vocab=FULL_VOCAB, tied=True, seed=3)
    hf_reference(transformers_module, "llama", state, tied=True).to(dtype).save_pretrained(
        tmp_path, safe_serialization=True
    )
    copy_tokenizer(embedded_dir, tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == dtype  # really saved in half precision

    loaded = registry.load(str(tmp_path))
    assert loaded.module.embed_tokens.weight.dtype == torch.float32
    ids = torch.randint(0, FULL_VOCAB, (16,), generator=torch.Generator().manual_seed(7))
    # The reference: the same half-precision weights in a float32 model (casting the saved model back
    # would also round its rotary frequency buffer, which the checkpoint does not hold).
    rounded = {k: v.to(dtype).float() for k, v in state.items()}
    theirs = hf_logits(hf_reference(transformers_module, "llama", rounded, tied=True), ids)
    torch.testing.assert_close(prefill_logits(loaded, ids), theirs, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_sharded_checkpoint_loads(transformers_module: Any, embedded_dir: Path, tmp_path: Path) -> None:
    state = tiny_state(vocab=FULL_VOCAB, tied=False, seed=4)
    reference = hf_reference(transformers_module, "llama", state, tied=False)
    reference.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="5MB")
    copy_tokenizer(embedded_dir, tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    loaded = registry.load(str(tmp_path))
    ids = torch.randint(0, FULL_VOCAB, (12,), generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(prefill_logits(loaded, ids), hf_logits(reference, ids), atol=1e-4, rtol=0)


# --- (b) GGUF files against transformers -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arch", "tied", "bias"),
    [pytest.param("llama", True, False, id="llama"), pytest.param("qwen2", False, True, id="qwen2")],
)
def test_gguf_f32_matches_transformers(
    arch: str,
    tied: bool,
    bias: bool,
    transformers_module: Any,
    real_tokenizer_fields: dict[str, Any],
    home: Path,
    tmp_path: Path,
) -> None:
    state = tiny_state(vocab=FULL_VOCAB, tied=tied, bias=bias, seed=10)
    reference = hf_reference(transformers_module, arch, state, tied)
    path = write_gguf(tmp_path / "tiny.gguf", state, real_tokenizer_fields, arch=arch)

    loaded = registry.load(str(path))
    assert loaded.config.model_type == arch
    assert loaded.config.tie_word_embeddings is tied
    assert loaded.config.attention_bias is bias
    assert loaded.source_quantization == {"F32": LAYERS * 7}
    ids = torch.randint(0, FULL_VOCAB, (24,), generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(prefill_logits(loaded, ids), hf_logits(reference, ids), atol=1e-4, rtol=0)
    # The tokenizer and template came from GGUF metadata alone.
    assert loaded.tokenizer.vocab_size == FULL_VOCAB
    assert loaded.tokenizer.eos_token == "<|im_end|>"
    assert loaded.template.source == real_tokenizer_fields["tokenizer.chat_template"]
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("¿Qué tal? 12345")) == "¿Qué tal? 12345"


@pytest.mark.slow
def test_gguf_q8_0_matches_transformers(
    transformers_module: Any, real_tokenizer_fields: dict[str, Any], home: Path, tmp_path: Path
) -> None:
    """Q8_0 layer weights: our dequantized network equals transformers holding the same rounded weights."""
    state = tiny_state(vocab=FULL_VOCAB, tied=True, seed=12)
    path = write_gguf(
        tmp_path / "q8.gguf",
        state,
        real_tokenizer_fields,
        quant=lambda name: QType.Q8_0 if is_2d_layer_weight(name) else None,
    )
    layer_weights = {n for n in state if n.startswith("model.layers.") and "layernorm" not in n}
    reference = hf_reference(
        transformers_module, "llama", quantized_copy(state, QType.Q8_0, layer_weights), True
    )
    exact = hf_reference(transformers_module, "llama", state, True)

    loaded = registry.load(str(path))
    assert loaded.source_quantization == {"Q8_0": LAYERS * 7}
    assert registry.pick_quantization(loaded) == "none"
    ids = torch.randint(0, FULL_VOCAB, (24,), generator=torch.Generator().manual_seed(13))
    ours = prefill_logits(loaded, ids)
    torch.testing.assert_close(ours, hf_logits(reference, ids), atol=1e-4, rtol=0)
    # and 8-bit rounding moves the logits of the unquantized network only a little
    unquantized = hf_logits(exact, ids)
    assert (ours - unquantized).abs().max() < 0.05 * unquantized.abs().max()


# --- Llama 3 RoPE scaling ---------------------------------------------------------------------------

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 8.0,
    "original_max_position_embeddings": 128,
    "rope_theta": 10000.0,
}


def llama_cpp_rope_factors(head_dim: int, theta: float, rope: dict[str, Any]) -> np.ndarray:
    """The `rope_freqs.weight` tensor llama.cpp's convert_hf_to_gguf.py writes for llama3 scaling."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context = rope["original_max_position_embeddings"]
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            out.append(1.0)
        elif wavelen > old_context / low:
            out.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("source", ["hf", "gguf"])
def test_llama3_rope_scaling_matches_transformers(
    source: str,
    transformers_module: Any,
    real_tokenizer_fields: dict[str, Any],
    embedded_dir: Path,
    home: Path,
    tmp_path: Path,
) -> None:
    """Positions past the original context, where llama3 scaling changes the result (head_dim 32)."""
    heads, kv_heads = 2, 1
    state = tiny_state(vocab=FULL_VOCAB, seed=40, heads=heads, kv_heads=kv_heads)
    reference = hf_reference(
        transformers_module, "llama", state, True, heads=heads, kv_heads=kv_heads, rope_parameters=LLAMA3_ROPE
    )
    plain = hf_reference(transformers_module, "llama", state, True, heads=heads, kv_heads=kv_heads)
    if source == "hf":
        reference.save_pretrained(tmp_path / "m", safe_serialization=True)
        copy_tokenizer(embedded_dir, tmp_path / "m")
        loaded = registry.load(str(tmp_path / "m"))
    else:
        factors = llama_cpp_rope_factors(HIDDEN // heads, 10000.0, LLAMA3_ROPE)
        assert ((factors > 1) & (factors < 8)).sum() >= 2  # a few frequencies in the transition band
        path = write_gguf(
            tmp_path / "l3.gguf",
            state,
            real_tokenizer_fields,
            heads=heads,
            kv_heads=kv_heads,
            extra={"rope_freqs.weight": factors},
        )
        loaded = registry.load(str(path))
    assert loaded.config.rope_scaling is not None
    assert loaded.config.rope_scaling["rope_type"] == "llama3"
    ids = torch.randint(0, FULL_VOCAB, (200,), generator=torch.Generator().manual_seed(41))
    ours, theirs = prefill_logits(loaded, ids), hf_logits(reference, ids)
    assert (theirs - hf_logits(plain, ids)).abs().max() > 0.1  # the scaling matters for this input
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=0)


@pytest.mark.parametrize(
    ("head_dim", "theta", "rope"),
    [
        # Llama 3.1 8B and Llama 3.2 1B
        (128, 500000.0, {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
        (64, 500000.0, {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
        (32, 10000.0, LLAMA3_ROPE),
    ],
)
def test_llama3_scaling_recovered_from_gguf_factors(
    head_dim: int, theta: float, rope: dict[str, Any]
) -> None:
    from tertulia.models.config import ModelConfig
    from tertulia.models.gguf import llama3_scaling_from_factors
    from tertulia.models.llama import rope_frequencies

    rope = {"original_max_position_embeddings": 8192, **rope, "rope_type": "llama3"}
    base: dict[str, Any] = dict(
        model_type="llama",
        vocab_size=10,
        hidden_size=head_dim * 2,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=20000,
        rope_theta=theta,
    )
    factors = llama_cpp_rope_factors(head_dim, theta, rope)
    recovered = llama3_scaling_from_factors(factors, ModelConfig(**base))
    assert recovered is not None and recovered["factor"] == rope["factor"]
    expected = rope_frequencies(ModelConfig(**base, rope_scaling=rope), 20000)
    got = rope_frequencies(ModelConfig(**base, rope_scaling=recovered), 20000)
    torch.testing.assert_close(torch.view_as_real(got), torch.view_as_real(expected), atol=1e-5, rtol=0)
    assert llama3_scaling_from_factors(np.ones_like(factors), ModelConfig(**base)) is None
    with pytest.raises(ModelLoadError, match="rope_freqs"):
        llama3_scaling_from_factors(np.linspace(1, 5, len(factors)), ModelConfig(**base))
    with pytest.raises(ModelLoadError, match="rope_freqs"):
        llama3_scaling_from_factors(factors[:-1], ModelConfig(**base))


# --- GGUF without transformers (fast) ---------------------------------------------------------------

SMALL_VOCAB = len(small_tokenizer_fields()["tokenizer.ggml.tokens"])


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_and_hf_directory_give_the_same_network(tied: bool, home: Path, tmp_path: Path) -> None:
    """The GGUF path (rotary permutation, tensor renaming, Q4_0 dequantization) against the HF path."""
    state = tiny_state(vocab=SMALL_VOCAB, tied=tied, seed=20)
    fields = small_tokenizer_fields()
    path = write_gguf(
        tmp_path / "m.gguf", state, fields, quant=lambda n: QType.Q4_0 if ".attn_q." in n else None
    )
    q_names = {n for n in state if "q_proj.weight" in n}
    from_gguf = registry.load(str(path))
    hf_dir = registry.converted_dir(path)
    direct = write_hf_dir(
        tmp_path / "hf",
        quantized_copy(state, QType.Q4_0, q_names),
        hf_config_dict(vocab=SMALL_VOCAB, tied=tied),
        hf_dir,
    )
    from_hf = registry.load(str(direct))
    ids = torch.randint(0, SMALL_VOCAB, (20,), generator=torch.Generator().manual_seed(21))
    ours = prefill_logits(from_gguf, ids)
    assert ours.abs().max() > 1.0
    torch.testing.assert_close(ours, prefill_logits(from_hf, ids), atol=1e-4, rtol=0)
    assert from_gguf.source_quantization == {"Q4_0": LAYERS, "F32": LAYERS * 6}
    assert from_gguf.name == "m.gguf"


def test_pick_quantization_for_tiny_gguf_files(home: Path, tmp_path: Path) -> None:
    state = tiny_state(vocab=SMALL_VOCAB, seed=22)
    fields = small_tokenizer_fields()
    four_bit = write_gguf(
        tmp_path / "q41.gguf", state, fields, quant=lambda n: QType.Q4_1 if is_2d_layer_weight(n) else None
    )
    full = write_gguf(tmp_path / "f32.gguf", state, fields)
    assert registry.pick_quantization(registry.load(str(four_bit))) == "int4"
    assert registry.pick_quantization(registry.load(str(full))) == "none"
    assert registry.pick_quantization(registry.load(str(full)), "int8") == "int8"


# --- (c) errors: always ModelLoadError, with a message ----------------------------------------------


def assert_load_error(spec: str | Path, *fragments: str) -> ModelLoadError:
    with pytest.raises(ModelLoadError) as info:
        registry.load(str(spec))
    message = str(info.value)
    assert message and "\n" not in message.strip()
    for fragment in fragments:
        assert fragment.lower() in message.lower(), message
    return info.value


def no_conversion_left_behind(home: Path) -> None:
    cache = home / "cache"
    assert not cache.exists() or not any(cache.iterdir()), list(cache.iterdir())


def test_missing_path(home: Path, tmp_path: Path) -> None:
    assert_load_error(tmp_path / "nowhere" / "model.gguf", "No model")
    assert_load_error("no-such-model-name", "no-such-model-name")


def test_file_that_is_not_gguf(home: Path, tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"\x00" * 128)
    assert_load_error(path, "not a .gguf file")


@pytest.mark.parametrize("size", [0, 100, 1 << 20])
def test_truncated_gguf(size: int, embedded_gguf: Path, home: Path, tmp_path: Path) -> None:
    path = tmp_path / "cut.gguf"
    with embedded_gguf.open("rb") as f:
        path.write_bytes(f.read(size))
    assert_load_error(path, "cut.gguf")
    no_conversion_left_behind(home)


def test_truncated_tiny_gguf_in_tensor_data(home: Path, tmp_path: Path) -> None:
    """Metadata intact, tensor data cut short."""
    full = write_gguf(tmp_path / "full.gguf", tiny_state(vocab=SMALL_VOCAB), small_tokenizer_fields())
    data = full.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 4096])
    assert_load_error(cut, "cut.gguf")
    no_conversion_left_behind(home)


@pytest.mark.parametrize("header", [b"", b"GGUF", b"GGUF\x03\x00\x00\x00"])
def test_random_bytes_named_gguf(header: bytes, home: Path, tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(header + np.random.default_rng(0).bytes(64 * 1024))
    assert_load_error(path, "x.gguf")
    no_conversion_left_behind(home)


def test_unsupported_gguf_architecture(home: Path, tmp_path: Path) -> None:
    path = write_gguf(
        tmp_path / "g.gguf", tiny_state(vocab=SMALL_VOCAB), small_tokenizer_fields(), arch="gpt2"
    )
    assert_load_error(path, "gpt2", "architecture")
    no_conversion_left_behind(home)


def test_unsupported_hf_architecture(embedded_dir: Path, tmp_path: Path) -> None:
    config = hf_config_dict("gpt2", vocab=SMALL_VOCAB)
    directory = write_hf_dir(tmp_path / "gpt2", tiny_state(vocab=SMALL_VOCAB), config, embedded_dir)
    assert_load_error(directory, "gpt2", "architecture")


@pytest.mark.parametrize("kind", ["llama", "bert", None])
def test_gguf_tokenizer_not_byte_level_bpe(kind: str | None, home: Path, tmp_path: Path) -> None:
    fields = small_tokenizer_fields()
    path = tmp_path / "spm.gguf"
    if kind is None:  # no tokenizer.ggml.model at all
        fields["tokenizer.ggml.model"] = "gpt2"
        write_gguf(path, tiny_state(vocab=SMALL_VOCAB), fields)
        _drop_metadata_key(path, "tokenizer.ggml.model")
    else:
        fields["tokenizer.ggml.model"] = kind
        write_gguf(path, tiny_state(vocab=SMALL_VOCAB), fields)
    assert_load_error(path, "tokenizer", str(kind))
    no_conversion_left_behind(home)


@pytest.mark.parametrize("damage", ["no-tokens", "short-token-types", "merge-of-unknown-tokens"])
def test_gguf_tokenizer_metadata_damaged(damage: str, home: Path, tmp_path: Path) -> None:
    fields = small_tokenizer_fields()
    if damage == "short-token-types":
        fields["tokenizer.ggml.token_type"] = fields["tokenizer.ggml.token_type"][:-5]
    elif damage == "merge-of-unknown-tokens":
        fields["tokenizer.ggml.merges"] = ["zz qq"]
    path = tmp_path / "tok.gguf"
    write_gguf(path, tiny_state(vocab=SMALL_VOCAB), fields)
    if damage == "no-tokens":
        # with llama.vocab_size present, only the tokenizer notices the missing token list
        path = write_gguf(path, tiny_state(vocab=SMALL_VOCAB), fields, vocab_size=SMALL_VOCAB)
        _drop_metadata_key(path, "tokenizer.ggml.tokens")
    expected = {
        "no-tokens": "0 tokens",
        "short-token-types": "257 token types",
        "merge-of-unknown-tokens": "zz",
    }
    assert_load_error(path, "GGUF tokenizer", expected[damage])
    no_conversion_left_behind(home)


def _drop_metadata_key(path: Path, key: str) -> None:
    """Rename a metadata key in place (same length), so readers no longer find it."""
    data = bytearray(path.read_bytes())
    encoded = key.encode()
    at = data.find(struct.pack("<Q", len(encoded)) + encoded)
    assert at > 0
    data[at + 8 : at + 8 + len(encoded)] = b"x" * len(encoded)
    path.write_bytes(bytes(data))


def test_gguf_missing_metadata(home: Path, tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "meta.gguf", tiny_state(vocab=SMALL_VOCAB), small_tokenizer_fields())
    _drop_metadata_key(path, "llama.block_count")
    assert_load_error(path, "metadata")


def test_gguf_missing_tensor(home: Path, tmp_path: Path) -> None:
    path = write_gguf(
        tmp_path / "hole.gguf",
        tiny_state(vocab=SMALL_VOCAB),
        small_tokenizer_fields(),
        skip=frozenset({"blk.1.ffn_up.weight"}),
    )
    assert_load_error(path, "model.layers.1.mlp.up_proj.weight")


def test_gguf_unexpected_tensor(home: Path, tmp_path: Path) -> None:
    """A Qwen3-style q-norm: not part of the Llama block, so loading must refuse rather than ignore it."""
    extra = {"blk.0.attn_q_norm.weight": np.ones(HEAD_DIM, dtype=np.float32)}
    path = write_gguf(
        tmp_path / "qk.gguf", tiny_state(vocab=SMALL_VOCAB), small_tokenizer_fields(), extra=extra
    )
    assert_load_error(path, "blk.0.attn_q_norm.weight")
    no_conversion_left_behind(home)


def test_gguf_quantization_gguf_cannot_dequantize(home: Path, tmp_path: Path) -> None:
    """Q8_1 is a valid GGML type the gguf package has no dequantizer for (NotImplementedError)."""
    block, block_bytes = gguf.GGML_QUANT_SIZES[QType.Q8_1]
    with pytest.raises(NotImplementedError):  # the premise of this test
        gguf.quants.dequantize(np.zeros((1, block_bytes), dtype=np.uint8), QType.Q8_1)
    raw = np.random.default_rng(0).integers(0, 256, (FFN, HIDDEN // block * block_bytes), dtype=np.uint8)
    path = write_gguf(
        tmp_path / "q81.gguf",
        tiny_state(vocab=SMALL_VOCAB),
        small_tokenizer_fields(),
        raw={"blk.0.ffn_up.weight": (raw, QType.Q8_1)},
    )
    assert gguf.GGUFReader(str(path)).tensors[0] is not None  # the file itself is well-formed
    assert_load_error(path, "Q8_1", "blk.0.ffn_up.weight")
    no_conversion_left_behind(home)


def test_gguf_quantization_type_unknown_to_gguf(home: Path, tmp_path: Path) -> None:
    """A type id newer than the installed gguf package (the reader itself rejects it)."""
    path = write_gguf(tmp_path / "new.gguf", tiny_state(vocab=SMALL_VOCAB), small_tokenizer_fields())
    data = bytearray(path.read_bytes())
    name = b"blk.0.ffn_up.weight"
    at = data.find(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    (n_dims,) = struct.unpack_from("<I", data, at)
    type_at = at + 4 + 8 * n_dims
    assert struct.unpack_from("<I", data, type_at)[0] == QType.F32
    unknown = 250
    assert unknown not in {t.value for t in QType}
    struct.pack_into("<I", data, type_at, unknown)
    path.write_bytes(bytes(data))
    assert_load_error(path, "new.gguf", "quantization type")


def test_directory_without_config(embedded_dir: Path, tmp_path: Path) -> None:
    directory = tmp_path / "empty-model"
    directory.mkdir()
    copy_tokenizer(embedded_dir, directory)
    assert_load_error(directory, "config.json")


def test_directory_with_invalid_config(embedded_dir: Path, tmp_path: Path) -> None:
    directory = write_hf_dir(
        tmp_path / "m", tiny_state(vocab=SMALL_VOCAB), hf_config_dict(vocab=SMALL_VOCAB), embedded_dir
    )
    (directory / "config.json").write_text("{not json")
    assert_load_error(directory, "config.json")
    config = hf_config_dict(vocab=SMALL_VOCAB)
    del config["hidden_size"]
    (directory / "config.json").write_text(json.dumps(config))
    assert_load_error(directory, "hidden_size")


def test_directory_without_weights_or_tokenizer(embedded_dir: Path, tmp_path: Path) -> None:
    directory = write_hf_dir(
        tmp_path / "m", tiny_state(vocab=SMALL_VOCAB), hf_config_dict(vocab=SMALL_VOCAB), embedded_dir
    )
    (directory / "model.safetensors").unlink()
    assert_load_error(directory, "safetensors")
    other = write_hf_dir(
        tmp_path / "n", tiny_state(vocab=SMALL_VOCAB), hf_config_dict(vocab=SMALL_VOCAB), embedded_dir
    )
    (other / "tokenizer.json").unlink()
    assert_load_error(other, "tokenizer.json")
    (other / "tokenizer.json").write_text("{}")
    assert_load_error(other, "tokenizer")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_safetensors(damage: str, embedded_dir: Path, tmp_path: Path) -> None:
    directory = write_hf_dir(
        tmp_path / "m", tiny_state(vocab=SMALL_VOCAB), hf_config_dict(vocab=SMALL_VOCAB), embedded_dir
    )
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(
        {"garbage": np.random.default_rng(1).bytes(4096), "truncated": data[: len(data) // 2], "empty": b""}[
            damage
        ]
    )
    assert_load_error(directory, "model.safetensors")


@pytest.mark.parametrize("mismatch", ["hidden_size", "num_key_value_heads", "intermediate_size"])
def test_weights_that_contradict_config(mismatch: str, embedded_dir: Path, tmp_path: Path) -> None:
    config = hf_config_dict(vocab=SMALL_VOCAB)
    config[mismatch] = {"hidden_size": 32, "num_key_value_heads": 4, "intermediate_size": 96}[mismatch]
    if mismatch == "hidden_size":
        config["head_dim"] = HEAD_DIM
    directory = write_hf_dir(tmp_path / "m", tiny_state(vocab=SMALL_VOCAB), config, embedded_dir)
    assert_load_error(directory, "do not match")


def test_checkpoint_missing_a_weight(embedded_dir: Path, tmp_path: Path) -> None:
    state = tiny_state(vocab=SMALL_VOCAB)
    del state["model.layers.1.self_attn.k_proj.weight"]
    directory = write_hf_dir(tmp_path / "m", state, hf_config_dict(vocab=SMALL_VOCAB), embedded_dir)
    assert_load_error(directory, "model.layers.1.self_attn.k_proj.weight")


def test_checkpoint_with_more_layers_than_config(embedded_dir: Path, tmp_path: Path) -> None:
    state = tiny_state(vocab=SMALL_VOCAB)
    config = hf_config_dict(vocab=SMALL_VOCAB)
    config["num_hidden_layers"] = LAYERS - 1
    directory = write_hf_dir(tmp_path / "m", state, config, embedded_dir)
    assert_load_error(directory, f"model.layers.{LAYERS - 1}.")


def _run_cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TERTULIA_HOME=str(home), NO_COLOR="1")
    cli = Path(sys.executable).parent / "tertulia"
    assert cli.exists(), cli
    return subprocess.run(
        [str(cli), *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=300, check=False
    )


@pytest.mark.parametrize("bad", ["missing", "random", "not-gguf"])
def test_cli_reports_bad_model_in_one_line(bad: str, home: Path, tmp_path: Path) -> None:
    path = tmp_path / {"missing": "nope.gguf", "random": "x.gguf", "not-gguf": "weights.bin"}[bad]
    if bad != "missing":
        path.write_bytes(np.random.default_rng(2).bytes(8192))
    result = _run_cli("chat", "-m", str(path), "-p", "hi", home=home)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:"), result.stderr
    assert path.name in lines[0]


# --- (d) the conversion cache -----------------------------------------------------------------------


def test_converted_dir_of_embedded_model(embedded_gguf: Path) -> None:
    first = registry.converted_dir(embedded_gguf)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "source.json"):
        assert (first / name).is_file(), name
    weights = first / "model.safetensors"
    before = weights.stat().st_mtime_ns
    second = registry.converted_dir(embedded_gguf)
    assert second == first
    assert weights.stat().st_mtime_ns == before  # not rebuilt
    source = json.loads((first / "source.json").read_text())
    assert source["gguf"] == str(embedded_gguf.resolve())
    assert source["layer_quantization"] == {"Q4_1": 30 * 7}
    config = json.loads((first / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("llama", 30, 576)
    assert config["tie_word_embeddings"] is True
    assert not list(first.parent.glob(".converting-*"))


def test_conversion_cache_follows_the_file(home: Path, tmp_path: Path) -> None:
    """Same file -> same directory, no rework; a rewritten file -> a fresh conversion."""
    fields = small_tokenizer_fields()
    path = write_gguf(tmp_path / "m.gguf", tiny_state(vocab=SMALL_VOCAB, seed=30), fields)
    first = registry.converted_dir(path)
    assert first.parent == home / "cache"
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert registry.converted_dir(path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime

    write_gguf(path, tiny_state(vocab=SMALL_VOCAB, seed=31), fields)
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))  # a new mtime even on a coarse clock
    second = registry.converted_dir(path)
    assert second != first
    assert not first.exists(), "the conversion of the file's previous version is pruned"
    new = registry.load(str(second))
    assert torch.equal(
        new.module.embed_tokens.weight, tiny_state(vocab=SMALL_VOCAB, seed=31)["model.embed_tokens.weight"]
    )
    assert not list((home / "cache").glob(".converting-*"))


# --- (e) quantization choice ------------------------------------------------------------------------


@pytest.mark.slow
def test_pick_quantization_embedded_model(real_model: LoadedModel) -> None:
    assert real_model.source_quantization == {"Q4_1": 210}
    assert registry.pick_quantization(real_model) == "int4"
    assert registry.pick_quantization(real_model, "none") == "none"


def test_pick_quantization_hf_directory(embedded_dir: Path, tmp_path: Path) -> None:
    directory = write_hf_dir(
        tmp_path / "m", tiny_state(vocab=SMALL_VOCAB), hf_config_dict(vocab=SMALL_VOCAB), embedded_dir
    )
    loaded = registry.load(str(directory))
    assert loaded.source_quantization == {}
    assert registry.pick_quantization(loaded) == "none"
