"""`tertulia finetune` on a tiny random model: the output Tertulia serves, the checks made before any
training, and interruption (a requested stop, a real Ctrl-C) followed by --resume."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tertulia.errors import TertuliaError
from tertulia.models import registry
from tertulia.train.data import write_jsonl
from tertulia.train.finetune import Settings, finetune
from tertulia.train.identity import Identity, make
from tertulia.train.loop import Interrupted, Loop

pytestmark = pytest.mark.slow  # loads transformers and peft


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    write_jsonl(path, make(Identity(name="Nube")).train[:40])
    return path


def _settings(tiny_hf_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {"model": str(tiny_hf_dir), "epochs": 2, "lr": 5e-3, "batch_tokens": 256}
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def test_a_lora_run_writes_a_merged_model_that_tertulia_loads_and_describes(
    tiny_hf_dir: Path, data: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "nube"
    result = finetune(data, out, _settings(tiny_hf_dir, epochs=3))
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= names
    assert {"README.md", "metrics.json", "loss.png"} <= names and "checkpoint" not in names
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # 40 examples: 4 held out for validation (10%), measured every epoch.
    epochs = json.loads((out / "metrics.json").read_text())["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    assert all(0 <= e["val_accuracy"] <= 1 and e["val_loss"] > 0 for e in epochs)
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    card = (out / "README.md").read_text()
    assert "| training examples | 36 |" in card and "| validation examples | 4 |" in card
    assert "r=16, alpha=32" in card and "![loss curves](loss.png)" in card
    assert result.history.tokens > 0 and result.history.seconds > 0

    # Merged: plain Llama weights with no adapter left, changed from the base.
    weights = load_file(str(out / "model.safetensors"))
    assert not any("lora" in name for name in weights)
    base = load_file(str(tiny_hf_dir / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(weights[name], base[name])

    # Tertulia's own model computes what transformers computes from the same directory.
    loaded = registry.load(str(out))
    ids = loaded.template.encode([{"role": "user", "content": "¿Cómo te llamas?"}])
    reference = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0]
    from tertulia.engine.attention import PrefillAttention
    from tertulia.engine.kv_cache import one_sequence

    cache, table = one_sequence(loaded.config, len(ids))
    with torch.inference_mode():
        hidden = loaded.module(
            torch.tensor(ids), torch.arange(len(ids)), PrefillAttention(cache, table, 0, len(ids))
        )
        logits = loaded.module.compute_logits(hidden)
    assert torch.allclose(logits, expected, atol=1e-4)


def test_a_full_fine_tune_also_loads(tiny_hf_dir: Path, data: Path, tmp_path: Path) -> None:
    finetune(data, tmp_path / "full", _settings(tiny_hf_dir, method="full", epochs=1, lr=1e-3))
    weights = load_file(str(tmp_path / "full" / "model.safetensors"))
    base = load_file(str(tiny_hf_dir / "model.safetensors"))
    assert not torch.equal(weights["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert registry.load(str(tmp_path / "full")).config.num_hidden_layers == 2


def test_bad_data_is_reported_with_line_numbers_before_anything_is_written(
    tiny_hf_dir: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.jsonl"
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    lines = [json.dumps(good), "{not json", json.dumps({"messages": [{"role": "user", "content": "Hi?"}]})]
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(TertuliaError) as error:
        finetune(bad, tmp_path / "out", _settings(tiny_hf_dir))
    assert "line 2: bad_json" in str(error.value) and "line 3: no_assistant" in str(error.value)
    assert "nothing was trained" in str(error.value) and not (tmp_path / "out").exists()


def test_an_example_longer_than_the_context_is_refused_up_front(tiny_hf_dir: Path, tmp_path: Path) -> None:
    long = tmp_path / "long.jsonl"
    turn = {"role": "assistant", "content": "word " * 400}
    write_jsonl(long, [{"messages": [{"role": "user", "content": "Talk."}, turn]}])
    with pytest.raises(TertuliaError, match="line 1: too_long: .*context is 256"):
        finetune(long, tmp_path / "out", _settings(tiny_hf_dir))


def test_a_run_that_would_not_fit_in_memory_says_so_before_training(
    tiny_hf_dir: Path, data: Path, tmp_path: Path
) -> None:
    with pytest.raises(TertuliaError, match=r"needs about [\d.]+ GiB .* free\. Lower --batch-tokens"):
        finetune(data, tmp_path / "out", _settings(tiny_hf_dir, batch_tokens=10_000_000))
    assert not (tmp_path / "out").exists()


def test_an_existing_output_is_replaced_only_with_force_and_never_with_foreign_files(
    tiny_hf_dir: Path, data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "model"
    finetune(data, out, _settings(tiny_hf_dir, epochs=1))
    with pytest.raises(TertuliaError, match="already exists. Pass --force"):
        finetune(data, out, _settings(tiny_hf_dir, epochs=1))
    finetune(data, out, _settings(tiny_hf_dir, epochs=1), force=True)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(TertuliaError, match="notes.txt"):
        finetune(data, out, _settings(tiny_hf_dir, epochs=1), force=True)
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / "thesis.tex").write_text("mine too")
    with pytest.raises(TertuliaError, match="checkpoint/thesis.tex"):
        finetune(data, out, _settings(tiny_hf_dir, epochs=1), force=True)
    assert (out / "checkpoint" / "thesis.tex").read_text() == "mine too"
    shutil.rmtree(out / "checkpoint")
    # A model directory that no fine-tune wrote (here: the base model itself) is never replaced.
    with pytest.raises(TertuliaError, match="not the output of a fine-tune"):
        finetune(data, tiny_hf_dir, _settings(tiny_hf_dir, epochs=1), force=True)
    assert (tiny_hf_dir / "model.safetensors").exists()
    # Nor is the model being trained, even when an earlier fine-tune wrote it.
    with pytest.raises(TertuliaError, match="is the model being fine-tuned"):
        finetune(data, out, _settings(tiny_hf_dir, model=str(out), epochs=1), force=True)
    assert (out / "model.safetensors").exists()
    with pytest.raises(TertuliaError, match="--method must be lora or full"):
        finetune(data, tmp_path / "other", _settings(tiny_hf_dir, method="qlora"))
    with pytest.raises(TertuliaError, match="no interrupted run"):
        finetune(data, tmp_path / "never", _settings(tiny_hf_dir), resume=True)


class RunsCodeWhenLoaded:
    """Pickles as a call to `exec` that writes `marker`: full unpickling would run it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_an_interrupted_run_resumes_to_exactly_the_weights_of_an_uninterrupted_one(
    tiny_hf_dir: Path, data: Path, tmp_path: Path
) -> None:
    settings = _settings(tiny_hf_dir, epochs=3)
    finetune(data, tmp_path / "straight", settings)

    def stop_at_step_5(loop: Loop, _: object) -> None:
        loop.on_step = lambda report: loop.request_stop() if report.step == 5 else None

    out = tmp_path / "interrupted"
    with pytest.raises(Interrupted):
        finetune(data, out, settings, on_start=stop_at_step_5)
    assert (out / "checkpoint" / "state.pt").exists() and not (out / "model.safetensors").exists()
    with pytest.raises(TertuliaError, match="--resume to continue"):
        finetune(data, out, settings)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(out, corrupt)
    (corrupt / "checkpoint" / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TertuliaError, match="unreadable"):
        finetune(data, corrupt, Settings(), resume=True)
    marker = tmp_path / "ran"
    torch.save({"version": 2, "trap": RunsCodeWhenLoaded(marker)}, corrupt / "checkpoint" / "state.pt")
    with pytest.raises(TertuliaError, match="unreadable"):
        finetune(data, corrupt, Settings(), resume=True)
    assert not marker.exists()  # a checkpoint is read as data: a planted file cannot run code
    (corrupt / "checkpoint" / "run.json").write_text("{")
    with pytest.raises(TertuliaError, match="cannot be resumed"):
        finetune(data, corrupt, Settings(), resume=True)
    steps: list[int] = []
    finetune(data, out, Settings(), resume=True, on_step=lambda report: steps.append(report.step))
    assert steps[0] == 6  # the run went on from where it stopped, with its own settings
    straight = load_file(str(tmp_path / "straight" / "model.safetensors"))
    resumed = load_file(str(out / "model.safetensors"))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert (
        json.loads((out / "metrics.json").read_text())["epochs"]
        == json.loads((tmp_path / "straight" / "metrics.json").read_text())["epochs"]
    )


def test_ctrl_c_saves_the_run_and_resume_finishes_it(tiny_hf_dir: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    command = [sys.executable, "-m", "tertulia", "finetune", str(data), "--out", str(out)]
    command += ["--model", str(tiny_hf_dir), "--epochs", "20", "--patience", "20", "--batch-tokens", "256"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith("epoch 1:"):
            process.send_signal(signal.SIGINT)
            break
    rest, _ = process.communicate(timeout=120)
    output = "".join(seen) + rest
    assert process.returncode == 130, output
    assert "--resume" in output and (out / "checkpoint" / "state.pt").exists()
    finished = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "tertulia serve --model" in finished.stdout and (out / "model.safetensors").exists()
    assert not (out / "checkpoint").exists()


def test_a_shared_prefix_computed_once_gives_the_gradient_of_computing_every_row(tiny_hf_dir: Path) -> None:
    from tertulia.train.batches import TokenizedExample, collate
    from tertulia.train.finetune import build_model
    from tertulia.train.loop import AssistantLoss

    loss = AssistantLoss(build_model(tiny_hf_dir, _settings(tiny_hf_dir)))
    with torch.no_grad():  # adapters start at zero (B = 0): give them a value so every path has a gradient
        for name, param in loss.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    generator = torch.Generator().manual_seed(0)
    system = torch.randint(0, 49152, (12,), generator=generator).tolist()
    rows = []
    for length in (7, 10, 4):
        rest = torch.randint(0, 49152, (length,), generator=generator).tolist()
        rows.append(TokenizedExample(system + rest, [False] * 14 + [True] * (length - 2)))

    def gradients(shared: int) -> tuple[float, list[torch.Tensor]]:
        loss.zero_grad()
        batch = collate(rows, pad_id=0, shared=shared)
        nll, _ = loss(batch.input_ids, batch.targets, batch.prefix)
        nll.backward()
        return float(nll.detach()), [p.grad.clone() for p in loss.parameters() if p.requires_grad]

    plain_loss, plain = gradients(0)
    shared_loss, shared = gradients(12)
    assert shared_loss == pytest.approx(plain_loss, rel=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(plain, shared, strict=True))
    assert any(bool(g.abs().sum() > 0) for g in shared)
