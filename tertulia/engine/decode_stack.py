"""The batched decode forward through the C++ decode stack (native.py), when it can serve the model.

It serves int4 models on the CPU (the default for quantized GGUFs): every layer's four projections
packed by quant.Int4Linear. Anything else (float32 or int8 layers, another device, no built library)
gets None from `of`, and the model runner keeps the Python forward. The embedding, the final norm
and the LM head stay in Python: three calls per step. This module knows the model's weights and the
attention plan of one step, nothing of sequences or sampling.
"""

from __future__ import annotations

import torch

from tertulia.engine import native, quant
from tertulia.engine.attention import DecodeAttention
from tertulia.engine.kv_cache import KVCache
from tertulia.models.config import ModelConfig
from tertulia.models.llama import LlamaModel

_NONE = torch.empty(0, dtype=torch.long)


def fused_ops_run(config: ModelConfig) -> bool:
    """Whether the fused decode ops serve this model here: AVX2 and FMA, widths in multiples of 8."""
    widths = (config.hidden_size, config.head_dim, config.intermediate_size)
    return all(w % 8 == 0 for w in widths) and bool(torch.ops.tertulia.decode_ops_supported())


class NativeDecode:
    def __init__(self, module: LlamaModel, stack: torch.ScriptObject, fused: bool) -> None:
        self.module, self.stack, self.fused = module, stack, fused

    @classmethod
    def of(cls, module: LlamaModel, cache: KVCache, *, fused: bool | None = None) -> NativeDecode | None:
        """The C++ stack over `module`'s weights and `cache`'s pools, or None where it cannot serve.

        `fused` (by default wherever they run): the small ops between the matmuls fused
        (csrc/decode_ops.cpp); else the Python forward's own ATen calls, its logits bit for bit.
        """
        layers = list(module.layers)
        if cache.device.type != "cpu" or not layers:
            return None
        if not quant.fully_int4(module) or not native.available():
            return None
        projections = [[getattr(layer, name) for name in quant.INT4_TARGETS] for layer in layers]
        config = module.config
        # Only q/k/v may have a bias (Qwen2), in every layer or none (the config says which).
        biases = [row[0].bias for row in projections] if config.attention_bias else []

        def packed(index: int) -> list[torch.Tensor]:
            return [row[index].packed for row in projections]

        def scales(index: int) -> list[torch.Tensor]:
            return [row[index].scales_and_zeros for row in projections]

        if fused is None:
            fused = fused_ops_run(config)
        stack = torch.classes.tertulia.DecodeStack(
            [layer.input_norm.detach() for layer in layers],
            [layer.post_attention_norm.detach() for layer in layers],
            packed(0),
            scales(0),
            biases,
            packed(1),
            scales(1),
            packed(2),
            scales(2),
            packed(3),
            scales(3),
            list(cache.keys),
            list(cache.values),
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            projections[0][0].group_size,  # quant packs every layer with one group size
            float(config.rms_norm_eps),
            fused,
        )
        return cls(module, stack, fused)

    @torch.inference_mode()
    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attention: DecodeAttention
    ) -> torch.Tensor:
        """Hidden states after the final norm, as `LlamaModel.forward` gives them, bit for bit."""
        x, rotations = self.module.embed(input_ids, positions)
        buckets = attention.buckets
        paged = attention.paged
        x = self.stack.forward(
            x,
            rotations,
            attention.written,
            attention.tables if paged else _NONE,
            attention.lengths if paged else _NONE,
            attention.cache.block_size if paged else 0,
            [b.rows for b in buckets],
            [b.where for b in buckets],
            [b.span for b in buckets],
            [b.bias for b in buckets],
        )
        return self.module.final_norm(x)
