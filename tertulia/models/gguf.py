"""GGUF files -> an HF-format directory (config.json, model.safetensors, tokenizer, chat template).

Converting once and caching the result makes every later load a memory-mapped safetensors read.
Quantized tensors are dequantized to float32 with the `gguf` package's reference kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from tertulia.errors import ModelLoadError
from tertulia.models.config import SUPPORTED_MODEL_TYPES, ModelConfig
from tertulia.models.llama import deinterleave_rotary, llama3_scaled
from tertulia.models.tokenizer import Tokenizer

# Reports long work: (what, done, total).
Progress = Callable[[str, int, int], None]

_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# llama.cpp stores Llama 3.1+ RoPE scaling as this tensor of per-frequency divisors, not as metadata.
_ROPE_FACTORS = "rope_freqs.weight"


def _open(path: Path) -> Any:
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except ValueError as exc:
        if "GGMLQuantizationType" in str(exc):
            raise ModelLoadError(
                f"{path.name} uses a quantization type this gguf library does not know ({exc}).",
                "Re-quantize it to Q4_0/Q4_1/Q5_*/Q8_0/K-quants or upgrade the 'gguf' package.",
            ) from None
        raise ModelLoadError(f"{path.name} is not a readable GGUF file ({exc}).") from None
    except Exception as exc:  # numpy/struct errors on truncated files
        raise ModelLoadError(
            f"{path.name} is not a readable GGUF file ({type(exc).__name__}: {exc}).",
            "The file may be truncated or corrupt: download or build it again.",
        ) from None


def read_fields(reader: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name, field in reader.fields.items():
        try:
            fields[name] = field.contents()
        except Exception:  # unusual value types: skip rather than fail on metadata we do not use
            continue
    return fields


def config_from_fields(fields: dict[str, Any], tensor_names: set[str]) -> ModelConfig:
    arch = fields.get("general.architecture")
    if arch not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"Unsupported architecture '{arch}' in GGUF.",
            f"Tertulia serves Llama-family models ({', '.join(SUPPORTED_MODEL_TYPES)}).",
        )

    def get(key: str, default: Any = None) -> Any:
        return fields.get(f"{arch}.{key}", default)

    try:
        heads = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        vocab = get("vocab_size") or len(fields["tokenizer.ggml.tokens"])
        config = ModelConfig(
            model_type=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_hidden_layers=int(get("block_count")),
            num_attention_heads=heads,
            num_key_value_heads=int(get("attention.head_count_kv", heads)),
            max_position_embeddings=int(get("context_length", 2048)),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            head_dim=int(get("attention.key_length", hidden // heads)),
            tie_word_embeddings="output.weight" not in tensor_names,
            attention_bias="blk.0.attn_q.bias" in tensor_names,
            rope_scaling=_rope_scaling(get("rope.scaling.type"), get("rope.scaling.factor")),
            bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=fields.get("tokenizer.ggml.eos_token_id"),
        )
    except (TypeError, KeyError) as exc:
        raise ModelLoadError(f"GGUF metadata is incomplete ({exc}).", "The file may be corrupt.") from None
    return config


def _rope_scaling(kind: str | None, factor: float | None) -> dict[str, Any] | None:
    if kind in (None, "none") or not factor:
        return None
    if kind != "linear":
        raise ModelLoadError(f"Unsupported RoPE scaling '{kind}' in GGUF.")
    return {"rope_type": "linear", "factor": float(factor)}


def llama3_scaling_from_factors(factors: np.ndarray, config: ModelConfig) -> dict[str, Any] | None:
    """HF's llama3 `rope_scaling` equivalent to llama.cpp's `rope_freqs.weight` divisors.

    llama.cpp divides frequency j by factors[j]: 1 for short wavelengths, `factor` for long ones, and
    1 / ((1 - s) / factor + s) in between, where s = (original / wavelength - low) / (high - low) is
    linear in 1 / wavelength. Only the band edges original/low and original/high matter, so with low = 1
    a line fitted through the in-between frequencies gives `high` and `original`. Factors this cannot
    reproduce are refused rather than silently ignored (that would run the model with the wrong RoPE).
    """
    head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
    factors = np.asarray(factors, dtype=np.float64).reshape(-1)
    if factors.shape[0] != head_dim // 2:
        raise ModelLoadError(f"{_ROPE_FACTORS} has {factors.shape[0]} values, expected {head_dim // 2}.")
    if np.allclose(factors, 1.0):
        return None
    factor = float(factors.max())
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelength = 2 * np.pi / inv_freq
    band = (factors > 1 + 1e-4) & (factors < factor * (1 - 1e-4))
    scaling: dict[str, Any] | None = None
    if band.sum() >= 2:
        smooth = (1 / factors[band] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(1 / wavelength[band], smooth, 1)
        if intercept < 0:
            high = 1 - 1 / intercept
            scaling = {
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": 1.0,
                "high_freq_factor": round(float(high), 4),
                "original_max_position_embeddings": round(float(-slope / intercept)),
            }
    if scaling is None or not np.allclose(_llama3_divisors(inv_freq, scaling), factors, rtol=1e-3, atol=1e-4):
        raise ModelLoadError(
            f"The RoPE frequency factors in {_ROPE_FACTORS} are not Llama 3 scaling.",
            "Tertulia cannot run this model with the right positions; convert it from an HF directory.",
        )
    return scaling


def _llama3_divisors(inv_freq: np.ndarray, scaling: dict[str, Any]) -> np.ndarray:
    """What llama.py's llama3 scaling divides each frequency by (for checking the fit above)."""
    scaled = llama3_scaled(torch.from_numpy(inv_freq), scaling).numpy()
    return inv_freq / scaled


def _dequantize(tensor: Any) -> np.ndarray:
    from gguf import quants

    try:
        data = quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise ModelLoadError(
            f"Tensor {tensor.name} uses quantization {tensor.tensor_type.name}, which Tertulia cannot read.",
            "Re-quantize the model to Q4_0/Q4_1/Q5_*/Q8_0 or a K-quant, or use an HF directory.",
        ) from None
    shape = tuple(int(d) for d in reversed(tensor.shape))
    return np.ascontiguousarray(data.reshape(shape), dtype=np.float32)


def convert(path: Path, out_dir: Path, progress: Progress | None = None) -> dict[str, int]:
    """Write an HF-format model directory equivalent to the GGUF file at `path`.

    Returns how many layer weight matrices each GGUF quantization type held (e.g. {"Q4_1": 210}),
    which decides whether re-quantizing to int4 for serving loses anything.
    """
    reader = _open(path)
    fields = read_fields(reader)
    names = {t.name for t in reader.tensors}
    config = config_from_fields(fields, names)
    tokenizer = Tokenizer.from_gguf_fields(fields)
    state: dict[str, torch.Tensor] = {}
    layer_types: dict[str, int] = {}
    for done, tensor in enumerate(reader.tensors):
        if progress:
            progress(f"converting {path.name}", done, len(reader.tensors))
        name = tensor.name
        if name == _ROPE_FACTORS:
            config.rope_scaling = llama3_scaling_from_factors(_dequantize(tensor), config)
            continue
        if name in _GLOBAL_TENSORS:
            key = _GLOBAL_TENSORS[name]
        elif name.startswith("blk.") and name.split(".", 2)[2] in _LAYER_TENSORS:
            _, index, rest = name.split(".", 2)
            key = f"model.layers.{index}.{_LAYER_TENSORS[rest]}"
            if rest.endswith(".weight") and len(tensor.shape) == 2:
                kind = tensor.tensor_type.name
                layer_types[kind] = layer_types.get(kind, 0) + 1
        else:
            raise ModelLoadError(
                f"Unexpected tensor '{name}' in {path.name}.", "Is this a Llama-family model?"
            )
        weight = torch.from_numpy(_dequantize(tensor).copy())
        # llama.cpp's converter reorders q/k rows for its rotary layout; undo it to get HF's layout.
        if config.model_type == "llama" and ".q_proj." in key:
            weight = deinterleave_rotary(weight, config.num_attention_heads)
        elif config.model_type == "llama" and ".k_proj." in key:
            weight = deinterleave_rotary(weight, config.num_key_value_heads)
        state[key] = weight.contiguous()
    if "model.embed_tokens.weight" not in state:
        raise ModelLoadError(f"{path.name} has no token_embd.weight tensor.", "The file may be corrupt.")
    if config.vocab_size != state["model.embed_tokens.weight"].shape[0]:
        config.vocab_size = state["model.embed_tokens.weight"].shape[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save(out_dir)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(out_dir, fields.get("tokenizer.chat_template"))
    return layer_types
