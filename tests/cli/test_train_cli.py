"""The three commands of "train your own GPT", as a learner runs them, on a slice of shipped data:
tokenizer → pretraining → chat tuning, then the result answers in `tertulia chat` and is offered by
`tertulia serve` to the web app's model picker and to the official client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.cli.test_chat_cli import tertulia
from tests.server.conftest import free_port, wait_until_serving

pytestmark = pytest.mark.slow


def test_tokenizer_pretrain_sft_then_chat_and_serve(tmp_path: Path) -> None:
    tok, base, chat = tmp_path / "tok", tmp_path / "base", tmp_path / "chat"
    made = tertulia("train", "tokenizer", "--corpus", "chatterbot", "--vocab-size", "768", "--out", str(tok))
    assert made.returncode == 0, made.stderr
    assert "bytes per token" in made.stdout and (tok / "tokenizer.json").exists()

    pretrained = tertulia(
        "train", "pretrain", "--corpus", "chatterbot", "--tokenizer", str(tok), "--out", str(base),
        "--depth", "2", "--context", "128", "--batch-tokens", "1024", "--tokens", "300000",
        "--evaluations", "4",
        timeout=600,
    )  # fmt: skip
    assert pretrained.returncode == 0, pretrained.stderr
    assert "held-out bits per byte" in pretrained.stdout
    stage = json.loads((base / "metrics.json").read_text())["stages"][0]
    bits = [e["bits_per_byte"] for e in stage["evaluations"]]
    assert len(bits) >= 4 and bits[-1] < bits[0] - 0.5  # it learnt: validation fell
    served = stage["metrics"]["held-out bits per byte (lm-eval's rolling windows, served by the engine)"]
    assert abs(served - bits[-1]) < 0.25  # the engine scores what training measured

    tuned = tertulia(
        "train", "sft", "--base", str(base), "--data", "chatterbot", "--out", str(chat), "--epochs", "2",
        timeout=600,
    )  # fmt: skip
    assert tuned.returncode == 0, tuned.stderr
    metrics = json.loads((chat / "metrics.json").read_text())
    assert [s["name"] for s in metrics["stages"]] == ["pretraining", "chat tuning"]
    epochs = metrics["epochs"]
    assert epochs[-1]["val_loss"] < epochs[0]["val_loss"]
    report = (chat / "report.md").read_text()
    assert "| pretraining |" in report and "| chat tuning |" in report and "### Chat samples" in report

    reply = tertulia("chat", "--model", str(chat), "-p", "Do you have any brothers?", "--max-tokens", "24")
    assert reply.returncode == 0, reply.stderr
    assert reply.stdout.strip()  # a reply, in the model's own (small) words

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tertulia", "serve", "--model", str(chat), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, TERTULIA_HOME=str(tmp_path / "home")),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(server, url)
        picker = httpx.get(f"{url}/api/models").json()
        assert [m["id"] for m in picker] == ["chat"] and picker[0]["context_length"] == 128
        client = OpenAI(base_url=f"{url}/v1", api_key="none")
        model = client.models.list().data[0].id
        answer = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hello, how are you?"}], max_tokens=16
        )
        assert answer.choices[0].message.content and answer.usage.completion_tokens > 0
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_bad_input_is_one_clear_line(tmp_path: Path) -> None:
    small = tertulia(
        "train", "tokenizer", "--corpus", "chatterbot", "--vocab-size", "100", "--out", str(tmp_path / "t")
    )
    assert small.returncode != 0 and "smaller than the 256 byte tokens" in small.stderr
    assert "Traceback" not in small.stderr
    missing = tertulia(
        "train",
        "pretrain",
        "--corpus",
        "nowhere.txt",
        "--tokenizer",
        str(tmp_path),
        "--out",
        str(tmp_path / "b"),
    )
    assert missing.returncode != 0 and "No corpus 'nowhere.txt'" in missing.stderr
    both = tertulia(
        "train", "pretrain", "-c", "chatterbot", "-t", str(tmp_path), "-o", str(tmp_path / "c"),
        "--tokens", "1000", "--time-budget", "1m",
    )  # fmt: skip
    assert both.returncode != 0 and "not both" in both.stderr
    no_base = tertulia(
        "train", "sft", "--base", str(tmp_path), "--data", "chatterbot", "--out", str(tmp_path / "s")
    )
    assert no_base.returncode != 0 and "is not a model directory" in no_base.stderr
