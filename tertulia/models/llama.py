"""A Llama-family decoder written for serving.

Covers Llama, SmolLM2, Mistral and Qwen2-style configs: RMSNorm, rotary embeddings, grouped-query
attention, SwiGLU, tied or untied head, optional q/k/v biases. Differences from a training-oriented
implementation, each for decode speed on a CPU:

- q/k/v and gate/up are fused into one matmul each (fewer, larger weight reads);
- rotary embeddings use the interleaved (GPT-J/GGUF) layout, applied to q and k together as one
  complex multiply; loaders permute HF weights into that layout once, at load time;
- tokens are a flat list `[N]` with explicit positions; the attention itself (and the KV cache) is
  provided by the caller, so the same module serves prefill, batched decode and any cache layout.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from tertulia.errors import ModelLoadError
from tertulia.models.config import ModelConfig


class AttentionBackend(Protocol):
    """Stores this step's k/v in the cache and attends over everything cached so far."""

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [N, H, D]; k, v: [N, KVH, D] -> attention output [N, H * D]."""
        ...


def rope_frequencies(config: ModelConfig, length: int) -> torch.Tensor:
    """Complex rotations e^{i·pos·θ_j}, shape [length, head_dim / 2]."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif scaling.get("rope_type") == "llama3":
        inv_freq = llama3_scaled(inv_freq, scaling)
    positions = torch.arange(length, dtype=torch.float64)
    angles = torch.outer(positions, inv_freq)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def llama3_scaled(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = float(scaling["factor"])
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    original = float(scaling.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    mid = (wavelen <= original / low) & (wavelen >= original / high)
    return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.eps = config.rms_norm_eps
        hidden, ffn = config.hidden_size, config.intermediate_size
        qkv_out = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.input_norm = nn.Parameter(torch.ones(hidden))
        self.qkv_proj = nn.Linear(hidden, qkv_out, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        self.post_attention_norm = nn.Parameter(torch.ones(hidden))
        self.gate_up_proj = nn.Linear(hidden, 2 * ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)
        self._rotary_width = (self.num_heads + self.num_kv_heads) * self.head_dim
        # What the projections compute in: float32, or bf16 once quantized to int4 (set by engine.quant).
        self.matmul_dtype = torch.float32

    def forward(self, x: torch.Tensor, rotations: torch.Tensor, attention: AttentionBackend) -> torch.Tensor:
        n = x.shape[0]
        # Matmul inputs are cast once here (not inside every quantized linear); the residual stream,
        # rotary embeddings and the KV cache stay float32.
        h = F.rms_norm(x, (x.shape[-1],), self.input_norm, self.eps).to(self.matmul_dtype)
        qkv = self.qkv_proj(h).float()
        heads = self.num_heads + self.num_kv_heads
        qk = torch.view_as_complex(qkv[:, : self._rotary_width].reshape(n, heads, self.head_dim // 2, 2))
        qk = torch.view_as_real(qk * rotations).reshape(n, heads, self.head_dim)
        v = qkv[:, self._rotary_width :].reshape(n, self.num_kv_heads, self.head_dim)
        out = attention(self.index, qk[:, : self.num_heads], qk[:, self.num_heads :], v)
        x = x + self.o_proj(out.to(self.matmul_dtype))
        h = F.rms_norm(x, (x.shape[-1],), self.post_attention_norm, self.eps).to(self.matmul_dtype)
        gate, up = self.gate_up_proj(h).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.Parameter(torch.ones(config.hidden_size))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer(
            "rotations", rope_frequencies(config, config.max_position_embeddings), persistent=False
        )

    @classmethod
    def empty(cls, config: ModelConfig) -> LlamaModel:
        """A module with uninitialised weights, to be filled by `load_hf_state_dict`.

        Skips the random initialisation (which writes every weight) without the meta device, whose
        first use imports much of torch's compiler stack (most of a second at start-up).
        """
        saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
        nn.Linear.reset_parameters = nn.Embedding.reset_parameters = lambda self: None  # type: ignore[method-assign]
        try:
            return cls(config)
        finally:
            nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved  # type: ignore[method-assign]

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attention: AttentionBackend
    ) -> torch.Tensor:
        """Hidden states after the final norm, [N, hidden], for flat tokens `input_ids` [N]."""
        x, rotations = self.embed(input_ids, positions)
        for layer in self.layers:
            x = layer(x, rotations, attention)
        return self.final_norm(x)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the first layer takes: token embeddings [N, hidden] and their rotations [N, 1, D/2]."""
        return self.embed_tokens(input_ids), self.rotations[positions].unsqueeze(1)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.norm, self.config.rms_norm_eps)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def load_hf_state_dict(self, state: dict[str, torch.Tensor], *, projections: bool = True) -> None:
        """Load HF-named, HF-layout weights (as in model.safetensors of a Llama/Qwen2 checkpoint).

        `projections=False` leaves the layers' projection weights unloaded (their tensors hold no
        meaningful values) for `load_projections` to fill later: a server whose quantized weights
        are cached never needs them, and fusing them costs a tenth of a second at every start.
        """
        tracked = _AccessTracker(state)
        try:
            fused = fuse_hf_state_dict(tracked, self.config, projections=projections)
        except KeyError as missing:
            raise ModelLoadError(f"The checkpoint lacks the weight {missing}.") from None
        # Weights nobody reads mean config.json describes a different model (e.g. fewer layers than
        # the checkpoint has): running it would give wrong output without any error.
        unused = sorted(
            k
            for k in set(state) - tracked.used
            if not k.endswith("rotary_emb.inv_freq")
            and not (k == "lm_head.weight" and self.config.tie_word_embeddings)
            and (projections or not _is_projection(k))
        )
        if unused:
            raise ModelLoadError(
                f"The checkpoint has weights its config.json does not describe ({', '.join(unused[:3])}"
                f"{', ...' if len(unused) > 3 else ''}).",
                "Check num_hidden_layers and the architecture in config.json.",
            )
        missing = self.load_state_dict(fused, strict=projections, assign=True).missing_keys
        left = [k for k in missing if not k.endswith(PROJECTION_WEIGHTS)]
        if left:
            raise ModelLoadError(f"The checkpoint lacks the weight {left[0]}.")
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Built on the meta device, the module has no rotation table yet: it is derived, not loaded.
        device = self.embed_tokens.weight.device
        if self.rotations.device != device:
            self.rotations = rope_frequencies(self.config, self.config.max_position_embeddings).to(device)

    def load_projections(self, state: dict[str, torch.Tensor]) -> None:
        """The projection weights `load_hf_state_dict(..., projections=False)` left out."""
        fused = fuse_hf_state_dict(state, self.config)
        wanted = {k: v for k, v in fused.items() if k.endswith(PROJECTION_WEIGHTS)}
        self.load_state_dict(wanted, strict=False, assign=True)


PROJECTION_WEIGHTS = tuple(f"{name}.weight" for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))
_HF_PROJECTIONS = (
    "q_proj.weight",
    "k_proj.weight",
    "v_proj.weight",
    "o_proj.weight",
    "gate_proj.weight",
    "up_proj.weight",
    "down_proj.weight",
)


def _is_projection(key: str) -> bool:
    return key.startswith("model.layers.") and key.endswith(_HF_PROJECTIONS)


class _AccessTracker(dict):
    """A state dict that remembers which keys were read."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__(state)
        self.used: set[str] = set()

    def __getitem__(self, key: str) -> torch.Tensor:
        self.used.add(key)
        return super().__getitem__(key)


def interleave_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder rows of a q/k projection from HF's rotate-half layout to interleaved pairs."""
    rows = weight.shape[0]
    head_dim = rows // heads
    rest = weight.shape[1:]
    return weight.reshape(heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(rows, *rest)


def deinterleave_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of `interleave_rotary`: GGUF's llama layout back to HF's."""
    rows = weight.shape[0]
    head_dim = rows // heads
    rest = weight.shape[1:]
    return weight.reshape(heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest)


def fuse_hf_state_dict(
    state: dict[str, torch.Tensor], config: ModelConfig, *, projections: bool = True
) -> dict[str, torch.Tensor]:
    h, kvh = config.num_attention_heads, config.num_key_value_heads
    out: dict[str, torch.Tensor] = {
        "embed_tokens.weight": state["model.embed_tokens.weight"],
        "norm": state["model.norm.weight"],
    }
    tied = config.tie_word_embeddings or "lm_head.weight" not in state
    out["lm_head.weight"] = out["embed_tokens.weight"] if tied else state["lm_head.weight"]
    for i in range(config.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        attn = src + "self_attn."
        out[dst + "input_norm"] = state[src + "input_layernorm.weight"]
        out[dst + "post_attention_norm"] = state[src + "post_attention_layernorm.weight"]
        if config.attention_bias:
            out[dst + "qkv_proj.bias"] = torch.cat(
                [
                    interleave_rotary(state[attn + "q_proj.bias"], h),
                    interleave_rotary(state[attn + "k_proj.bias"], kvh),
                    state[attn + "v_proj.bias"],
                ]
            )
        if not projections:
            continue
        out[dst + "qkv_proj.weight"] = torch.cat(
            [
                interleave_rotary(state[attn + "q_proj.weight"], h),
                interleave_rotary(state[attn + "k_proj.weight"], kvh),
                state[attn + "v_proj.weight"],
            ]
        )
        out[dst + "o_proj.weight"] = state[attn + "o_proj.weight"]
        mlp = src + "mlp."
        out[dst + "gate_up_proj.weight"] = torch.cat(
            [state[mlp + "gate_proj.weight"], state[mlp + "up_proj.weight"]]
        )
        out[dst + "down_proj.weight"] = state[mlp + "down_proj.weight"]
    return out
