"""HF-format model directories: config.json, *.safetensors, tokenizer.json, chat template."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from tertulia.errors import ModelLoadError
from tertulia.models.config import ModelConfig
from tertulia.models.tokenizer import read_tokenizer_config


def read_config(directory: Path) -> ModelConfig:
    path = directory / "config.json"
    if not path.exists():
        raise ModelLoadError(
            f"{directory} has no config.json.", "Point --model at an HF-format model directory."
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON ({exc}).") from None
    config = ModelConfig.from_hf_dict(data)
    generation = directory / "generation_config.json"
    if generation.exists():
        try:
            eos = json.loads(generation.read_text()).get("eos_token_id")
        except json.JSONDecodeError:
            eos = None
        if eos is not None:
            config.eos_token_id = eos
    return config


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"{directory} has no *.safetensors weights.", "Save the model with safe_serialization=True."
        )
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(
                f"{file.name} is unreadable ({exc}).", "The file may be truncated or corrupt: save it again."
            ) from None
    # Fine-tuned checkpoints may be bf16/fp16; the engine computes in float32 unless quantized.
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def read_chat_template(directory: Path) -> str | None:
    jinja = directory / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    template = read_tokenizer_config(directory).get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template
