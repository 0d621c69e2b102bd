"""The one architecture description every loader produces and the Llama module consumes."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tertulia.errors import ModelLoadError

# HF `model_type`s whose layers are the Llama block (RMSNorm, RoPE, GQA, SwiGLU).
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    head_dim: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    rope_scaling: dict[str, Any] | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(
                f"Unsupported architecture '{self.model_type}'.",
                f"Tertulia serves Llama-family models ({', '.join(SUPPORTED_MODEL_TYPES)}).",
            )
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError("Attention heads must be a multiple of key/value heads.")

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> ModelConfig:
        model_type = data.get("model_type", "llama")
        if (
            model_type not in SUPPORTED_MODEL_TYPES
        ):  # before reading keys other architectures name differently
            raise ModelLoadError(
                f"Unsupported architecture '{model_type}'.",
                f"Tertulia serves Llama-family models ({', '.join(SUPPORTED_MODEL_TYPES)}).",
            )
        try:
            return cls(
                model_type=model_type,
                vocab_size=data["vocab_size"],
                hidden_size=data["hidden_size"],
                intermediate_size=data["intermediate_size"],
                num_hidden_layers=data["num_hidden_layers"],
                num_attention_heads=data["num_attention_heads"],
                num_key_value_heads=data.get("num_key_value_heads") or data["num_attention_heads"],
                max_position_embeddings=data.get("max_position_embeddings", 2048),
                rms_norm_eps=data.get("rms_norm_eps", 1e-5),
                rope_theta=_rope_theta(data),
                head_dim=data.get("head_dim"),
                tie_word_embeddings=data.get("tie_word_embeddings", False),
                # Qwen2 always has q/k/v biases; Llama says so with attention_bias.
                attention_bias=data.get("attention_bias", model_type == "qwen2"),
                rope_scaling=_rope_scaling(data),
                bos_token_id=data.get("bos_token_id"),
                eos_token_id=data.get("eos_token_id"),
            )
        except KeyError as missing:
            raise ModelLoadError(f"config.json lacks {missing}.", "Is this a causal LM checkpoint?") from None

    def to_hf_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["architectures"] = [
            {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}[
                self.model_type
            ]
        ]
        data["hidden_act"] = "silu"
        data["torch_dtype"] = "float32"
        if self.rope_scaling is None:
            data.pop("rope_scaling")
        return data

    def save(self, directory: Path) -> None:
        (directory / "config.json").write_text(json.dumps(self.to_hf_dict(), indent=2))

    @property
    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)


def _rope_theta(data: dict[str, Any]) -> float:
    """Newer configs move rope_theta under rope_parameters."""
    params = data.get("rope_parameters") or {}
    return float(data.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _rope_scaling(data: dict[str, Any]) -> dict[str, Any] | None:
    scaling = data.get("rope_scaling") or data.get("rope_parameters")
    if not scaling:
        return None
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind in (None, "default"):
        return None
    if kind not in ("linear", "llama3"):
        raise ModelLoadError(f"Unsupported RoPE scaling '{kind}'.", "Supported: linear, llama3.")
    return dict(scaling, rope_type=kind)
