"""Quantization: int4/int8 layers against float references, and the int4 weight cache on disk."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from tertulia.engine import quant
from tertulia.engine.engine import Engine
from tertulia.errors import TertuliaError
from tertulia.models import registry
from tertulia.models.registry import LoadedModel
from tests.answers import PARIS_QUESTIONS, ask_in_terminal_chat, assert_mostly
from tests.engine.test_engine import generate, greedy, random_prompt, recompute_logits

MakeModel = Callable[..., LoadedModel]


def grid_weight(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """A weight already on an asymmetric 4-bit grid: W = scale * q + min per group of 32, q in 0..15,
    with both 0 and 15 present in every group (so min/max recover each group's scale and minimum)."""
    generator = torch.Generator().manual_seed(seed)
    groups = in_features // quant.GROUP_SIZE
    q = torch.randint(0, 16, (out_features, groups, quant.GROUP_SIZE), generator=generator)
    q[:, :, 0], q[:, :, 1] = 0, 15
    q = q.gather(2, torch.rand(q.shape, generator=generator).argsort(dim=2))  # put 0 and 15 anywhere
    scale = torch.rand(out_features, groups, 1, generator=generator) * 0.05 + 0.01
    low = torch.randn(out_features, groups, 1, generator=generator) * 0.3
    return (scale * q + low).reshape(out_features, in_features)


def test_int4_linear_reproduces_a_weight_on_its_grid() -> None:
    weight = grid_weight(48, 128)
    linear = nn.Linear(128, 48, bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    layer = quant.Int4Linear.quantize(linear)
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(1))
    y = layer(x)
    reference = F.linear(x, weight)
    assert y.shape == (3, 5, 48) and y.dtype == torch.float32
    # Only bf16 rounding (activations, scales, output): about 3 significant digits.
    error = (y - reference).norm() / reference.norm()
    assert error < 1e-2
    torch.testing.assert_close(y, reference, rtol=2e-2, atol=2e-2 * float(reference.abs().mean()))


def test_int4_linear_keeps_the_bias() -> None:
    weight = grid_weight(16, 64, seed=2)
    linear = nn.Linear(64, 16, bias=True)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.normal_(0, 1)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    y = quant.Int4Linear.quantize(linear)(x)
    reference = F.linear(x, weight, linear.bias.detach())
    assert (y - reference).norm() / reference.norm() < 1e-2


def fake_quantize(weight: torch.Tensor) -> torch.Tensor:
    """`weight` rounded to its 4-bit asymmetric grid (groups of 32, scale and minimum from min/max)."""
    groups = weight.reshape(weight.shape[0], -1, quant.GROUP_SIZE)
    low = groups.amin(dim=-1, keepdim=True)
    scale = (groups.amax(dim=-1, keepdim=True) - low) / 15
    return (((groups - low) / scale).round() * scale + low).reshape(weight.shape)


def test_int4_linear_rounds_any_weight_to_its_grid() -> None:
    """Off the grid, Int4Linear is exactly a 4-bit rounding of the weight (plus bf16 noise), no worse."""
    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(4))
    linear = nn.Linear(128, 48, bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(5))
    y = quant.Int4Linear.quantize(linear)(x)
    exact, rounded = F.linear(x, weight), F.linear(x, fake_quantize(weight))
    assert (y - rounded).norm() / rounded.norm() < 1e-2
    # ... and that rounding is coarse: the grid tests above are not passing by accident.
    assert 2e-2 < (y - exact).norm() / exact.norm() < 0.2


def snap_to_int4_grid(model: LoadedModel) -> None:
    """Put the decoder's linear weights on their 4-bit grid, as a Q4_1 GGUF source's weights are."""
    with torch.no_grad():
        for layer in model.module.layers:
            for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
                weight = getattr(layer, name).weight
                weight.copy_(fake_quantize(weight))


def logits_similarity(reference: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Cosine similarity per position, and the fraction of positions with the same argmax."""
    agreement = float((logits.argmax(-1) == reference.argmax(-1)).float().mean())
    return F.cosine_similarity(logits, reference, dim=-1), agreement


def test_int4_model_on_its_grid_keeps_its_logits(make_tiny_model: MakeModel) -> None:
    tokens = random_prompt(40, seed=6)
    reference_model = make_tiny_model(seed=5)
    snap_to_int4_grid(reference_model)
    reference = recompute_logits(reference_model, tokens)
    model = make_tiny_model(seed=5)
    snap_to_int4_grid(model)
    assert quant.apply(model.module, "int4") == "int4"
    first = model.module.layers[0]
    assert isinstance(first.qkv_proj, quant.Int4Linear) and isinstance(first.down_proj, quant.Int4Linear)
    assert isinstance(model.module.lm_head, quant.Int8Linear)
    similarity, agreement = logits_similarity(reference, recompute_logits(model, tokens))
    assert float(similarity.min()) > 0.99
    assert agreement > 0.8


def test_int4_model_off_its_grid_stays_close(make_tiny_model: MakeModel) -> None:
    """Random Gaussian weights lose ~9% per layer to 4-bit rounding: close, but not token-exact."""
    tokens = random_prompt(40, seed=6)
    reference = recompute_logits(make_tiny_model(seed=5), tokens)
    model = make_tiny_model(seed=5)
    quant.apply(model.module, "int4")
    similarity, _ = logits_similarity(reference, recompute_logits(model, tokens))
    assert float(similarity.mean()) > 0.85


def test_int8_model_keeps_its_logits(make_tiny_model: MakeModel) -> None:
    tokens = random_prompt(40, seed=6)
    reference = recompute_logits(make_tiny_model(seed=5), tokens)
    model = make_tiny_model(seed=5)
    assert quant.apply(model.module, "int8") == "int8"
    assert type(model.module.layers[0].qkv_proj) is not nn.Linear
    similarity, agreement = logits_similarity(reference, recompute_logits(model, tokens))
    # Dynamic int8 also quantizes activations, so some positions drift more than others.
    assert float(similarity.mean()) > 0.99
    assert float(similarity.min()) > 0.9
    assert agreement > 0.6


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_engine_runs_quantized(make_tiny_model: MakeModel, mode: str) -> None:
    prompt = random_prompt(8, seed=7)
    plain = generate(Engine(make_tiny_model(seed=6)), prompt, greedy(10))[0]
    engine = Engine(make_tiny_model(seed=6), quantization=mode)
    assert engine.quantization == mode
    seq = generate(engine, prompt, greedy(10))[0]
    assert seq.finish_reason == "length" and len(seq.output) == 10
    assert seq.output[0] == plain.output[0]


def test_unknown_quantization_is_rejected(make_tiny_model: MakeModel) -> None:
    with pytest.raises(TertuliaError, match="int4"):
        quant.apply(make_tiny_model().module, "int3")


def test_int4_skips_layers_the_kernel_cannot_pack(make_tiny_model: MakeModel) -> None:
    model = make_tiny_model(intermediate_size=100)  # down_proj has 100 inputs: not whole groups of 32
    assert quant.apply(model.module, "int4") == "int4"
    assert all(layer.matmul_dtype == torch.float32 for layer in model.module.layers)
    assert len(generate(Engine(model, max_batch=1), random_prompt(4), greedy(3))[0].output) == 3
    with pytest.raises(TertuliaError, match="already quantized"):
        quant.apply(model.module, "int8")


def test_int4_weights_cached_on_disk_reload_identically(make_tiny_model: MakeModel, tmp_path) -> None:
    """The second load reads the packed weights back (they must be usable at any batch size)."""
    cache_file = quant.cache_file(tmp_path, "tiny")
    first, second = make_tiny_model(seed=5), make_tiny_model(seed=5)
    quant.apply(first.module, "int4", cache_file)
    assert cache_file.exists()
    quant.apply(second.module, "int4", cache_file)
    x = torch.randn(16, first.config.hidden_size)
    with torch.inference_mode():
        assert torch.equal(first.module.compute_logits(x), second.module.compute_logits(x))
        for a, b in zip(first.module.layers, second.module.layers, strict=True):
            h = torch.randn(16, first.config.hidden_size).bfloat16()
            assert torch.equal(a.qkv_proj(h), b.qkv_proj(h))


def test_the_cache_is_named_after_what_its_layout_depends_on(tmp_path: Path) -> None:
    path = quant.cache_file(tmp_path, "model-abc")
    assert path.parent == tmp_path
    assert torch.__version__.replace("+", "_") in path.name
    assert path.name.endswith(f"-{quant.int4_kernels()}.safetensors")
    assert f"-v{quant.FORMAT_VERSION}-" in path.name


def cached_model(make_tiny_model: MakeModel, path: Path, seed: int = 5) -> LoadedModel:
    model = make_tiny_model(seed=seed)
    quant.apply(model.module, "int4", path)
    return model


def rewrite_cache(path: Path, change_tensors=None, metadata: dict[str, str] | None = None) -> None:
    """Rewrite a cache file as another machine might have left it."""
    with safe_open(str(path), "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        stored = handle.metadata()
    if change_tensors:
        change_tensors(tensors)
    save_file(tensors, str(path), metadata={**stored, **(metadata or {})})


def same_logits(a: LoadedModel, b: LoadedModel) -> bool:
    tokens = random_prompt(12, seed=2)
    return torch.equal(recompute_logits(a, tokens), recompute_logits(b, tokens))


def foreign_layout(tensors: dict[str, torch.Tensor]) -> None:
    """The same bytes in another order, as another kernel set's packing would hold them."""
    for key, value in tensors.items():
        if key.endswith(".packed"):
            tensors[key] = value.reshape(-1, 16).flip(1).reshape(value.shape).contiguous()


def test_a_cache_in_a_foreign_layout_is_refused_and_packed_again(
    make_tiny_model: MakeModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Labelled for this machine but packed otherwise: the fingerprint catches it."""
    path = quant.cache_file(tmp_path, "tiny")
    fresh = cached_model(make_tiny_model, path)
    rewrite_cache(path, foreign_layout)
    with caplog.at_level(logging.WARNING, logger="tertulia.engine.quant"):
        reloaded = cached_model(make_tiny_model, path)
    assert "standard deviations" in caplog.text and path.name in caplog.text
    assert len(caplog.records) == 1
    assert same_logits(fresh, reloaded)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tertulia.engine.quant"):
        third = cached_model(make_tiny_model, path)  # the rewritten cache is good again
    assert not caplog.records and same_logits(fresh, third)


def test_a_cache_labelled_for_other_kernels_is_refused(
    make_tiny_model: MakeModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = quant.cache_file(tmp_path, "tiny")
    fresh = cached_model(make_tiny_model, path)
    other = "avx512" if quant.int4_kernels() != "avx512" else "avx2"
    rewrite_cache(path, metadata={"kernels": other})
    with caplog.at_level(logging.WARNING, logger="tertulia.engine.quant"):
        reloaded = cached_model(make_tiny_model, path)
    assert f"packed for kernels {other}" in caplog.text
    assert same_logits(fresh, reloaded)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "no fingerprint"])
def test_a_damaged_cache_is_packed_again(make_tiny_model: MakeModel, tmp_path: Path, damage: str) -> None:
    path = quant.cache_file(tmp_path, "tiny")
    fresh = cached_model(make_tiny_model, path)
    if damage == "garbage":
        path.write_bytes(b"not a safetensors file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        rewrite_cache(path, lambda t: [t.pop(k) for k in list(t) if k.startswith("fingerprint.")])
    reloaded = cached_model(make_tiny_model, path)
    assert same_logits(fresh, reloaded)
    with safe_open(str(path), "pt") as handle:
        assert "fingerprint.logits" in handle.keys()  # noqa: SIM118


def test_caches_of_older_formats_are_removed_and_other_kernel_sets_kept(
    make_tiny_model: MakeModel, tmp_path: Path
) -> None:
    path = quant.cache_file(tmp_path, "tiny")
    older = tmp_path / "tiny-int4-v2.safetensors"
    other_torch = tmp_path / path.name.replace("-torch", "-torch0.0.1-old-")
    other_kernels = tmp_path / path.name.replace(f"-{quant.int4_kernels()}.", "-otherkernels.")
    unrelated = tmp_path / "another-int4-v2.safetensors"
    for stale in (older, other_torch, other_kernels, unrelated):
        stale.write_bytes(b"x")
    cached_model(make_tiny_model, path)
    assert path.exists() and other_kernels.exists() and unrelated.exists()
    assert not older.exists() and not other_torch.exists()


# --- a cache moved between CPUs, as a user meets it -----------------------------------------------

KERNEL_SETS = ["default", "avx2", "avx512"]  # torch's x86 CPU kernel sets, each running on fewer CPUs


def best_kernel_set() -> str:
    """This CPU's own kernel set (the tests may run under an ATEN_CPU_CAPABILITY override)."""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    code = "import torch; print(torch.backends.cpu.get_cpu_capability().lower())"
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env
    ).stdout.strip()


@pytest.mark.slow
@pytest.mark.parametrize("direction", ["up", "down"])
def test_a_cache_moved_to_another_cpu_kind_still_answers(
    embedded_dir: Path, tmp_path: Path, direction: str
) -> None:
    """Packed under one kernel set and read under another, even when labelled for the reader (as a
    copied file may be): the reader refuses it, says so in one line, and still knows Paris.

    PyTorch's int4 kernel is the one whose layout depends on the kernel set, so the engine's own
    kernel is switched off here (TERTULIA_NATIVE=0), as on a CPU without AVX512-BF16."""
    best = best_kernel_set()
    if best not in KERNEL_SETS[1:]:
        pytest.skip(f"no second x86 kernel set to compare with on this CPU ({best or 'unknown'})")
    lower = KERNEL_SETS[KERNEL_SETS.index(best) - 1]
    packer, reader = (lower, best) if direction == "up" else (best, lower)
    home = {"TERTULIA_HOME": str(tmp_path), "TERTULIA_NATIVE": "0"}
    model = ("--model", str(embedded_dir))

    answers, _ = ask_in_terminal_chat(
        PARIS_QUESTIONS[:1], *model, env={**home, "ATEN_CPU_CAPABILITY": packer}
    )
    assert_mostly(answers, "Paris", misses=0)
    [packed] = (tmp_path / "cache" / "quantized").glob(f"*-{packer}.safetensors")
    moved = packed.with_name(packed.name.replace(f"-{packer}.", f"-{reader}."))
    shutil.copy(packed, moved)
    rewrite_cache(moved, metadata={"kernels": reader})

    answers, result = ask_in_terminal_chat(
        PARIS_QUESTIONS[:3], *model, env={**home, "ATEN_CPU_CAPABILITY": reader}
    )
    assert_mostly(answers, "Paris")
    refusals = [line for line in result.stderr.splitlines() if "Packing the int4 weights again" in line]
    assert len(refusals) == 1 and moved.name in refusals[0] and "standard deviations" in refusals[0]

    answers, result = ask_in_terminal_chat(
        PARIS_QUESTIONS[:1], *model, env={**home, "ATEN_CPU_CAPABILITY": reader}
    )
    assert_mostly(answers, "Paris", misses=0)
    assert "Packing" not in result.stderr  # the rewritten cache is used as it is
    assert packed.exists()  # the packer's own cache is still there for its machines


def test_projection_weights_are_read_only_when_quantization_needs_them(tmp_path: Path) -> None:
    """A start with cached int4 weights never reads the float projections; a start without the cache
    reads them when packing, and both compute what an eagerly loaded model does."""
    path = quant.cache_file(tmp_path, "embedded")
    eager = registry.load(None)
    quant.apply(eager.module, "int4")
    packing = registry.load(None, defer_projections=True)
    quant.apply(packing.module, "int4", path, packing.load_deferred)
    assert path.exists() and same_logits(eager, packing)
    cached = registry.load(None, defer_projections=True)
    reads: list[str] = []
    quant.apply(cached.module, "int4", path, lambda: reads.append("projections"))
    assert reads == [] and same_logits(eager, cached)
    unquantized = registry.load(None, defer_projections=True)
    quant.apply(unquantized.module, "none", None, unquantized.load_deferred)
    reference = registry.load(None)
    quant.apply(reference.module, "none")
    assert same_logits(unquantized, reference)
