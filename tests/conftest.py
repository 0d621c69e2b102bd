"""Shared fixtures: the real embedded model (loaded once per session) and tiny random models.

Tests keep their data under TERTULIA_HOME (default: .test-home in the repository), so the one-time
GGUF conversion of the embedded model is reused across runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("TERTULIA_HOME", str(REPO / ".test-home"))

import torch  # noqa: E402

from tertulia.models import registry  # noqa: E402
from tertulia.models.chat_template import ChatTemplate  # noqa: E402
from tertulia.models.config import ModelConfig  # noqa: E402
from tertulia.models.llama import LlamaModel  # noqa: E402
from tertulia.models.registry import LoadedModel  # noqa: E402
from tertulia.models.tokenizer import Tokenizer  # noqa: E402
from tests.server.conftest import LiveServer  # noqa: E402


@pytest.fixture(scope="session")
def embedded_gguf() -> Path:
    """Path of the embedded default model's GGUF file (installed by `make`)."""
    _, path = registry.resolve("smollm2-135m")
    return path


@pytest.fixture(scope="session")
def embedded_dir(embedded_gguf: Path) -> Path:
    """The HF-format conversion of the embedded model (config.json, model.safetensors, tokenizer)."""
    return registry.converted_dir(embedded_gguf)


@pytest.fixture(scope="session")
def real_model(embedded_dir: Path) -> LoadedModel:
    """The embedded model in float32, shared by the session: do not quantize it in place
    (build an Engine with quantization="none", or load a private copy with registry.load())."""
    return registry.load("smollm2-135m")


@pytest.fixture(scope="session")
def real_tokenizer(embedded_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(embedded_dir)


def tiny_config(**overrides: object) -> ModelConfig:
    values: dict[str, object] = dict(
        model_type="llama",
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        eos_token_id=2,
    )
    values.update(overrides)
    return ModelConfig(**values)  # type: ignore[arg-type]


@pytest.fixture
def make_tiny_model(real_tokenizer: Tokenizer, embedded_dir: Path) -> Callable[..., LoadedModel]:
    return tiny_model_factory(real_tokenizer, embedded_dir)


def tiny_model_factory(real_tokenizer: Tokenizer, embedded_dir: Path) -> Callable[..., LoadedModel]:
    """Random-weight Llama-family models (2 layers, width 64) with the real tokenizer and template.

    Weights are scaled up so logits are peaked enough for greedy decoding to be stable under float noise.
    """
    from tertulia.models import hf

    template_source = hf.read_chat_template(embedded_dir)

    def make(seed: int = 0, **overrides: object) -> LoadedModel:
        config = tiny_config(**overrides)
        torch.manual_seed(seed)
        module = LlamaModel(config)
        with torch.no_grad():
            for name, param in module.named_parameters():
                if "norm" not in name:
                    param.normal_(0, 0.5 if "embed" in name else 0.2)
        module.eval()
        return LoadedModel(
            name=f"tiny-{config.model_type}",
            source=embedded_dir,
            config=config,
            module=module,
            tokenizer=real_tokenizer,
            template=ChatTemplate(template_source, real_tokenizer),
            source_quantization={},
        )

    return make


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory, embedded_dir: Path) -> Path:
    """A random-weight HF-format Llama directory (2 layers, width 32, context 256) with the real
    tokenizer and chat template: what training code reads, small enough to train in seconds."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("tiny-hf")
    small = tiny_config(hidden_size=32, intermediate_size=64, bos_token_id=1)
    config = LlamaConfig(**small.to_hf_dict())
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(embedded_dir / name, directory / name)
    return directory


@pytest.fixture(scope="session")
def live_server(embedded_dir: Path) -> Iterator[LiveServer]:
    """One real server on loopback for the session (the embedded model as served by default)."""
    from tertulia.engine.engine import Engine
    from tertulia.providers.local import LocalProvider
    from tertulia.server.app import create_app
    from tests.server.conftest import MODEL, running

    model = registry.load(MODEL)
    engine = Engine(model, quantization=registry.pick_quantization(model), max_batch=16)
    served = LocalProvider(engine)
    with running(create_app([served])) as url:
        yield LiveServer(url, served)


@pytest.fixture(scope="session")
def eval_report(tiny_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real report directory (`tertulia eval`'s writer) from a small suite on two precisions of the
    tiny model: quality tables, speed, side by side, ratings."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from tertulia.eval.report import write_report
    from tertulia.eval.run import ModelChoice, Silent, run_suite
    from tertulia.eval.suite import load_suite

    folder = tmp_path_factory.mktemp("report-source")
    suite_file = folder / "suite.yaml"
    suite_file.write_text(
        "name: tiny\ndescription: A <small> suite & its report.\ntasks:\n"
        "  - {kind: multiple_choice, name: trivia, file: 'builtin:trivia-choice.jsonl', limit: 3}\n"
        "  - {kind: speed, streams: [1], prompt_tokens: 16, max_tokens: 3, rounds: 1}\n"
        "  - {kind: side_by_side, prompts: ['<script>alert(1)</script> hi'], max_tokens: 4}\n"
    )
    suite = load_suite(suite_file)
    choices = [ModelChoice(str(tiny_hf_dir), "none"), ModelChoice(str(tiny_hf_dir), "int8")]
    # In a thread of its own: a browser test that asks for it first has an event loop running here.
    with ThreadPoolExecutor(1) as worker:
        outcomes = worker.submit(asyncio.run, run_suite(choices, suite, Silent())).result()
    return write_report(folder / "20261203-120000-tiny", suite, outcomes, {"smollm2-135m": (2, 1)})
