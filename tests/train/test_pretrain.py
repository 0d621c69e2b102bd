"""`train pretrain`: the model one depth makes, the windows it learns from, the budget, bad input, and a
short run that learns, is interrupted and resumes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tertulia.errors import TertuliaError
from tertulia.models import registry
from tertulia.train.corpora import corpus
from tertulia.train.loop import Interrupted, StepReport
from tertulia.train.pretrain import (
    Settings,
    Shape,
    Windows,
    _steps,
    parse_duration,
    pretrain,
)
from tertulia.train.tokenizer_train import train_tokenizer

pytestmark = pytest.mark.slow  # transformers


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pretrain") / "tok"
    train_tokenizer([corpus("chatterbot")], 512, out)
    return out


@pytest.mark.parametrize("depth", [1, 3, 6])
def test_the_parameter_count_of_a_depth_is_the_model_s_own(depth: int, tokenizer_dir: Path) -> None:
    from transformers import LlamaForCausalLM

    from tertulia.models.tokenizer import Tokenizer

    shape = Shape(depth, 512, 128)
    model = LlamaForCausalLM(shape.hf_config(Tokenizer.from_dir(tokenizer_dir)))
    assert shape.parameters == sum(p.numel() for p in model.parameters())
    assert (shape.hidden, shape.heads, model.config.num_hidden_layers) == (64 * depth, depth, depth)
    assert shape.intermediate % 64 == 0 and shape.flops_per_token > 6 * (
        shape.parameters - 512 * shape.hidden
    )


def test_windows_overlap_by_one_token_so_every_token_but_the_first_is_learnt_once() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    windows = Windows(tokens, 64, lambda ids: np.ones(len(ids), dtype=bool))
    assert len(windows) == 999 // 63
    targets = [t for w in windows for t, learnt in zip(w.ids[1:], w.trained[1:], strict=True) if learnt]
    assert targets == list(range(1, 1 + 63 * len(windows)))
    assert all(len(w) == 64 for w in windows)
    with pytest.raises(IndexError):
        windows[len(windows)]
    separators = Windows(np.array([0, 5, 6, 0, 7, 8], dtype=np.uint16), 6, lambda ids: ids != 0)
    assert separators[0].trained == [False, True, True, False, True, True]


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("15m", 900), ("1h30m", 5400), ("45", 45), ("1.5m", 90)]
)
def test_durations_read_as_people_write_them(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "15x", "m", "0s", ""])
def test_a_duration_that_is_not_one_is_refused(text: str) -> None:
    with pytest.raises(TertuliaError):
        parse_duration(text)


def test_a_time_budget_becomes_the_steps_that_fit_in_it() -> None:
    settings = Settings(time_budget=100.0, evaluations=4)
    # 100 s less 5 validations of 1 s (+1 s of samples each) and 15 s for writing: 75 s at 1,000 tok/s.
    assert _steps(settings, 1000.0, 100, 1.0, time.monotonic()) in (749, 750)
    assert _steps(Settings(time_budget=None, tokens=25_000), 1.0, 1000, 9.0, 0.0) == 25
    with pytest.raises(TertuliaError, match="leaves no time to train"):
        _steps(Settings(time_budget=20.0), 1000.0, 100, 1.0, time.monotonic())


def test_bad_settings_and_bad_input_are_refused_before_training(tokenizer_dir: Path, tmp_path: Path) -> None:
    source = [corpus("chatterbot")]
    with pytest.raises(TertuliaError, match="--depth must be between 1 and 48"):
        pretrain(source, tokenizer_dir, tmp_path / "a", Settings(depth=0))
    with pytest.raises(TertuliaError, match="needs about .* GiB of memory"):
        pretrain(source, tokenizer_dir, tmp_path / "b", Settings(depth=48, context=2048, batch_tokens=65536))
    assert not (tmp_path / "b").exists()
    with pytest.raises(TertuliaError, match="no tokenizer.json"):
        pretrain(source, tmp_path, tmp_path / "c", Settings())
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("Just a few words.\n")
    with pytest.raises(TertuliaError, match="not enough for one window of 512"):
        pretrain([corpus(str(tiny))], tokenizer_dir, tmp_path / "d", Settings())
    assert not (tmp_path / "d").exists()  # nothing half-made is left to block the next try
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    with pytest.raises(TertuliaError, match="line 2"):
        pretrain([corpus(str(broken))], tokenizer_dir, tmp_path / "d", Settings())
    assert not (tmp_path / "d").exists()
    # The default model's tokenizer has the chat tokens; one without them cannot make a chat model.
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    bare = tmp_path / "bare"
    bare.mkdir()
    Backend(models.BPE(vocab={"a": 0, "b": 1}, merges=[])).save(str(bare / "tokenizer.json"))
    with pytest.raises(TertuliaError, match="lacks <|endoftext|>, <|im_start|>, <|im_end|>"):
        pretrain(source, bare, tmp_path / "e", Settings())


def test_a_short_run_learns_writes_a_served_model_and_resumes_after_a_stop(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "base"
    settings = Settings(depth=2, context=64, tokens=64 * 8 * 60, batch_tokens=64 * 8, evaluations=3, lr=3e-3)
    source = [corpus("chatterbot")]

    def stop_at_25(report: StepReport) -> None:
        if report.step == 25:
            raise_stop()

    loops = []

    def started(loop: object, shape: Shape, facts: dict[str, object]) -> None:
        loops.append(loop)

    def raise_stop() -> None:
        loops[-1].request_stop()  # type: ignore[attr-defined]

    with pytest.raises(Interrupted):
        pretrain(source, tokenizer_dir, out, settings, on_start=started, on_step=stop_at_25)
    assert (out / "checkpoint" / "state.pt").exists() and not (out / "config.json").exists()
    with pytest.raises(TertuliaError, match="already exists"):
        pretrain(source, tokenizer_dir, out, settings)

    steps_after: list[int] = []
    result = pretrain(
        source, tokenizer_dir, out, Settings(), resume=True, on_step=lambda r: steps_after.append(r.step)
    )
    assert (
        steps_after[0] == 26 and steps_after[-1] == result.steps == 60
    )  # the recorded settings, not Settings()
    evaluations = result.evaluations
    assert [e.step for e in evaluations] == sorted({e.step for e in evaluations}) and evaluations[
        -1
    ].step == 60
    assert evaluations[-1].bits_per_byte < evaluations[0].bits_per_byte
    assert all(e.samples for e in evaluations)

    names = {p.name for p in out.iterdir()}
    assert names == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "report.md",
        "metrics.json",
        "curves.png",
    }
    report = (out / "report.md").read_text()
    for expected in (
        "## Environment",
        "| pretraining | ",
        "| depth | 2 |",
        "![training curves](curves.png)",
        "### Samples",
    ):
        assert expected in report
    stages = json.loads((out / "metrics.json").read_text())["stages"]
    assert stages[0]["name"] == "pretraining" and stages[0]["history"]["tokens"] == 60 * 64 * 8

    # The engine's own model computes what transformers computes from the directory.
    from transformers import AutoModelForCausalLM

    from tertulia.engine.attention import PrefillAttention
    from tertulia.engine.kv_cache import one_sequence

    loaded = registry.load(str(out))
    ids = loaded.tokenizer.encode("What is your name?")
    reference = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = reference(torch.tensor([ids])).logits[0]
        cache, table = one_sequence(loaded.config, len(ids))
        hidden = loaded.module(
            torch.tensor(ids), torch.arange(len(ids)), PrefillAttention(cache, table, 0, len(ids))
        )
        logits = loaded.module.compute_logits(hidden)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_a_run_slower_than_timed_is_cut_to_end_on_time_with_its_decay_complete(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    planned: list[int] = []
    rates: list[float] = []

    def slow_step(report: StepReport) -> None:
        rates.append(report.lr)
        time.sleep(0.1)  # each step now takes far longer than the steps that were timed

    result = pretrain(
        [corpus("chatterbot")],
        tokenizer_dir,
        tmp_path / "base",
        Settings(depth=1, context=64, batch_tokens=256, time_budget=45, evaluations=2),
        on_start=lambda loop, shape, facts: planned.append(int(facts["steps"])),
        on_step=slow_step,
    )
    assert result.steps < planned[0] and len(rates) == result.steps
    assert rates[-1] < 0.01 * max(rates)  # the learning rate still decayed to (nearly) zero at the cut
    run_steps = json.loads((tmp_path / "base" / "metrics.json").read_text())["stages"][0]["hyperparameters"]
    assert run_steps["steps"] == result.steps
