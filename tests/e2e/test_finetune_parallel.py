"""Data-parallel fine-tuning: `torchrun --nproc_per_node 2 -m tertulia finetune ...` on CPU (gloo)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tertulia.models import registry
from tertulia.train.data import write_jsonl
from tertulia.train.identity import Identity, make

pytestmark = pytest.mark.slow


def test_two_processes_train_one_model_on_halves_of_the_data(tiny_hf_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    write_jsonl(data, make(Identity(name="Nube")).train[:40])
    out = tmp_path / "model"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "tertulia", "finetune", str(data), "--out", str(out), "--model", str(tiny_hf_dir)]
    command += ["--epochs", "2", "--lr", "5e-3", "--batch-tokens", "256"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # One process speaks and writes; the model is whole and loads.
    assert done.stdout.count("tertulia serve --model") == 1
    assert "| processes | 2 |" in (out / "README.md").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert all("val_loss" in e for e in metrics["epochs"])
    # Each step counts the tokens of both processes: every epoch covers the 36 training examples.
    assert metrics["tokens"] >= 2 * 36 * 40
    assert registry.load(str(out)).config.num_hidden_layers == 2
