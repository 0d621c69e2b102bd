"""Training from scratch: what a time budget buys on chitchat, and training speed against a `Trainer`.

    python benchmarks/train_scratch.py [--minutes 15] [--depth 4] [--steps 40] [--rounds 3]

Quality: the three commands of the README as a user runs them, `tertulia train tokenizer` (4,096
tokens), `tertulia train pretrain --time-budget` and `tertulia train sft`, on the chitchat-dataset
corpus (their output is kept in the result file), then bits per byte on its held-out conversations
(the split `train/corpora.py` keeps out of every stage) for three models on the same text: the model
just trained and the embedded SmolLM2-135M (float32 weights), both by lm-evaluation-harness's
rolling windows through Tertulia's engine (`tertulia eval`'s `document_perplexity`), and a character
bigram counted on the training split.

Speed: the same model (the `--depth` model, float32), the same windows of the same token file, the
same batch, optimizer (AdamW, betas 0.9/0.95, weight decay 0.1), schedule and clipping, trained
`--steps` steps by Tertulia's loop and by a transformers `Trainer` (LlamaForCausalLM, its own loss),
each run a fresh process, the two alternating round by round. Both are timed the same way, steps only:
Tertulia sums its steps (from a batch's collation to its optimizer step), the Trainer is timed by a
callback from `on_train_begin` to its last `on_step_end`. Writes benchmarks/results/train_scratch.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    from benchmarks.machine import describe
except ImportError:  # run as a script from the benchmarks folder
    from machine import describe  # type: ignore[no-redef]

RESULT = Path(__file__).parent / "results" / "train_scratch.json"
CORPUS = "chitchat"
VOCAB = 4096


def _tertulia(*args: str) -> str:
    """Run a `tertulia` command as a user would, returning what it printed."""
    env = dict(os.environ, COLUMNS="100", TERTULIA_LANG="en")
    done = subprocess.run(
        [sys.executable, "-m", "tertulia", *args], capture_output=True, text=True, check=False, env=env
    )
    if done.returncode != 0:
        raise SystemExit(f"tertulia {' '.join(args)} failed:\n{done.stderr}")
    print(done.stdout, end="", flush=True)
    return done.stdout


def quality(work: Path, minutes: float, depth: int) -> dict[str, object]:
    from tertulia.eval.perplexity import document_perplexity
    from tertulia.eval.run import ModelChoice, open_model
    from tertulia.train.baseline import char_bigram_bits_per_byte
    from tertulia.train.corpora import corpora, documents

    tokenizer, base, chat = work / "tokenizer", work / "base", work / "chat"
    transcript = {}
    started = time.perf_counter()
    transcript["tokenizer"] = _tertulia("train", "tokenizer", "--corpus", CORPUS, "--out", str(tokenizer))
    tokenizer_seconds = time.perf_counter() - started
    started = time.perf_counter()
    transcript["pretrain"] = _tertulia(
        "train", "pretrain", "--corpus", CORPUS, "--tokenizer", str(tokenizer), "--out", str(base),
        "--depth", str(depth), "--time-budget", f"{minutes:g}m",
    )  # fmt: skip
    wall = time.perf_counter() - started
    started = time.perf_counter()
    transcript["sft"] = _tertulia("train", "sft", "--base", str(base), "--data", CORPUS, "--out", str(chat))
    sft_seconds = time.perf_counter() - started
    stage = json.loads((base / "metrics.json").read_text())["stages"][0]
    metrics = json.loads((tokenizer / "metrics.json").read_text())
    sources = corpora([CORPUS])
    held_out = [d.text for d in documents(sources, held_out=True)]
    provider = open_model(ModelChoice("smollm2-135m", "none"))
    try:
        smollm2 = asyncio.run(document_perplexity(provider, held_out))
    finally:
        provider.stop()
    bigram = char_bigram_bits_per_byte((d.text for d in documents(sources, held_out=False)), held_out)
    ours = stage["metrics"]["held-out bits per byte (lm-eval's rolling windows, served by the engine)"]
    history = stage["history"]
    return {
        "corpus": CORPUS,
        "held_out_documents": len(held_out),
        "held_out_bytes": sum(len(t.encode("utf-8")) for t in held_out),
        "tokenizer": {
            "vocab": metrics["vocab_size"],
            "seconds": tokenizer_seconds,
            "bytes_per_token": metrics["bytes_per_token"],
            "default_bytes_per_token": metrics["compression"]["held_out_bytes"]
            / metrics["compression"]["default_tokens"],
        },
        "model": {"depth": depth, **stage["model"]},
        "budget_seconds": minutes * 60,
        "wall_seconds": wall,
        "sft_seconds": sft_seconds,
        "training_seconds": history["seconds"],
        "tokens_seen": history["tokens"],
        "steps": stage["hyperparameters"]["steps"],
        "bits_per_byte": {
            "trained here (pretrain, before chat tuning)": ours,
            "SmolLM2-135M-Instruct (float32)": smollm2.bits_per_byte,
            "character bigram": bigram,
        },
        "evaluations": [
            {"step": e["step"], "tokens": e["tokens"], "bits_per_byte": e["bits_per_byte"]}
            for e in stage["evaluations"]
        ],
        "transcript": transcript,
        "report": (chat / "report.md").read_text(),
    }


# --- speed ----------------------------------------------------------------------------------------
def run_tertulia(tokenizer: Path, depth: int, steps: int) -> dict[str, float]:
    from tertulia.train.corpora import corpora
    from tertulia.train.pretrain import Settings, pretrain

    settings = Settings(depth=depth, time_budget=None, evaluations=1)
    settings.tokens = steps * settings.rows * settings.context
    out = Path(tempfile.mkdtemp()) / "model"
    result = pretrain(corpora([CORPUS]), tokenizer, out, settings)
    return {"tokens": result.history.tokens, "seconds": result.history.seconds, "steps": result.steps}


def run_trainer(tokenizer: Path, depth: int, steps: int) -> dict[str, float]:
    import numpy as np
    import torch
    from transformers import (
        LlamaForCausalLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )
    from transformers.utils import logging

    from tertulia.models.tokenizer import Tokenizer
    from tertulia.train.corpora import corpora
    from tertulia.train.pretrain import Settings, Shape, tokenize_corpus

    logging.set_verbosity_error()
    settings = Settings(depth=depth)
    words = Tokenizer.from_dir(tokenizer)
    token_file = Path(tempfile.mkdtemp()) / "train.bin"
    tokenize_corpus(words, corpora([CORPUS]), False, token_file)
    tokens = np.fromfile(token_file, dtype=np.uint16)
    context = settings.context
    count = (len(tokens) - 1) // (context - 1)

    class Windows(torch.utils.data.Dataset):
        """The same windows as Tertulia's (overlapping by one token), labels = inputs (the model shifts)."""

        def __len__(self) -> int:
            return count

        def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
            start = index * (context - 1)
            ids = torch.from_numpy(tokens[start : start + context].astype(np.int64))
            return {"input_ids": ids, "labels": ids}

    torch.manual_seed(settings.seed)
    model = LlamaForCausalLM(Shape(depth, words.vocab_size, context).hf_config(words))
    arguments = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=settings.rows,
        max_steps=steps,
        learning_rate=settings.lr,
        adam_beta2=settings.beta2,
        lr_scheduler_type="cosine",
        warmup_steps=settings.warmup,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=settings.seed,
    )

    class StepClock(TrainerCallback):
        started = ended = 0.0

        def on_train_begin(self, *args, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            self.ended = time.perf_counter()

    clock = StepClock()
    trainer = Trainer(
        model=model,
        args=arguments,
        train_dataset=Windows(),
        data_collator=default_data_collator,
        callbacks=[clock],
    )
    trainer.train()
    return {"tokens": steps * settings.rows * context, "seconds": clock.ended - clock.started, "steps": steps}


def speed(tokenizer: Path, depth: int, steps: int, rounds: int) -> dict[str, object]:
    runs: dict[str, list[dict[str, float]]] = {"tertulia": [], "trainer": []}
    for round_number in range(1, rounds + 1):
        order = ("tertulia", "trainer") if round_number % 2 else ("trainer", "tertulia")
        for worker in order:
            command = [
                sys.executable, __file__, "--worker", worker, "--tokenizer", str(tokenizer),
                "--depth", str(depth), "--steps", str(steps),
            ]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
            result = json.loads(line.removeprefix("RESULT "))
            result["tok/s"] = result["tokens"] / result["seconds"]
            runs[worker].append(result)
            print(f"round {round_number} {worker:9} {result['tok/s']:7.0f} tok/s", flush=True)
    medians = {worker: statistics.median(r["tok/s"] for r in rs) for worker, rs in runs.items()}
    return {"runs": runs, "medians": medians, "ratio": medians["tertulia"] / medians["trainer"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", choices=["tertulia", "trainer"])
    parser.add_argument("--tokenizer", type=Path)
    args = parser.parse_args()
    if args.worker:
        run = run_tertulia if args.worker == "tertulia" else run_trainer
        print("RESULT " + json.dumps(run(args.tokenizer, args.depth, args.steps)), flush=True)
        return
    work = Path(tempfile.mkdtemp(prefix="train-scratch-"))
    try:
        measured = quality(work, args.minutes, args.depth)
        for name, bits in measured["bits_per_byte"].items():  # type: ignore[union-attr]
            print(f"{name:35} {bits:.3f} bits per byte", flush=True)
        throughput = speed(work / "tokenizer", args.depth, args.steps, args.rounds)
        print(f"ratio of the medians: {throughput['ratio']:.2f}×", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "machine": describe(),
        "settings": {
            "minutes": args.minutes,
            "depth": args.depth,
            "steps": args.steps,
            "rounds": args.rounds,
        },
        "quality": measured,
        "speed": throughput,
    }
    RESULT.parent.mkdir(exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
