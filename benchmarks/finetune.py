"""Fine-tuning throughput: `tertulia finetune`'s loop against a plain transformers `Trainer`.

    python benchmarks/finetune.py [--rounds 3] [--epochs 1]

Same model (the embedded default, float32), same data (the identity dataset, assistant-only labels),
same LoRA (r=16, alpha=32, all linear layers), same optimizer and schedule, same machine. Each run is
a fresh process and the two alternate, round after round; the script prints tokens per second of
training (real tokens, padding not counted) for each, the medians, and the ratio. The Trainer gets
the usual recipe: batches of 8 examples padded by `DataCollatorForSeq2Seq`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}
LR = 1e-3


def make_data(directory: Path) -> Path:
    from tertulia.train.data import write_jsonl
    from tertulia.train.identity import Identity, make

    data = make(Identity())
    write_jsonl(directory / "train.jsonl", data.train)
    write_jsonl(directory / "validation.jsonl", data.validation)
    return directory / "train.jsonl"


def run_tertulia(train: Path, epochs: int) -> dict[str, float]:
    from tertulia.train.finetune import Settings, finetune

    settings = Settings(epochs=epochs, lr=LR, lora_r=LORA["r"], lora_alpha=LORA["lora_alpha"])
    out = Path(tempfile.mkdtemp()) / "model"
    result = finetune(train, out, settings, validation_file=train.with_name("validation.jsonl"))
    history = result.history
    return {
        "tokens": history.tokens,
        "seconds": history.seconds,
        "last_loss": history.epochs[-1]["train_loss"],
    }


def run_trainer(train: Path, epochs: int) -> dict[str, float]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    from tertulia.models import registry
    from tertulia.train.batches import IGNORE, tokenize
    from tertulia.train.data import validate

    _, directory = registry.model_directory()
    text = registry.load_text_side()
    examples = [
        tokenize(e.messages, text.template, sorted(text.tokenizer.end_of_turn_ids()))
        for e in validate(train).examples
    ]
    rows = {
        "input_ids": [e.ids for e in examples],
        "labels": [
            [t if trained else IGNORE for t, trained in zip(e.ids, e.trained, strict=True)] for e in examples
        ],
    }
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    arguments = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=8,
        num_train_epochs=epochs,
        learning_rate=LR,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=arguments,
        train_dataset=Dataset.from_dict(rows),
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding="longest"),
    )
    started = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - started
    return {
        "tokens": epochs * sum(len(e.ids) for e in examples),
        "seconds": seconds,
        "last_loss": output.training_loss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--worker", choices=["tertulia", "trainer"])
    parser.add_argument("--data", type=Path)
    args = parser.parse_args()
    if args.worker:
        run = run_tertulia if args.worker == "tertulia" else run_trainer
        print("RESULT " + json.dumps(run(args.data, args.epochs)), flush=True)
        return
    train = make_data(Path(tempfile.mkdtemp()))
    rates: dict[str, list[float]] = {"tertulia": [], "trainer": []}
    for round_number in range(1, args.rounds + 1):
        for worker in ("tertulia", "trainer"):
            command = [
                sys.executable,
                __file__,
                "--worker",
                worker,
                "--data",
                str(train),
                "--epochs",
                str(args.epochs),
            ]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
            result = json.loads(line.removeprefix("RESULT "))
            rate = result["tokens"] / result["seconds"]
            rates[worker].append(rate)
            print(
                f"round {round_number} {worker:9} {rate:6.1f} tok/s  ({result['tokens']} tokens in "
                f"{result['seconds']:.0f} s, train loss {result['last_loss']:.3f})",
                flush=True,
            )
    ours, theirs = statistics.median(rates["tertulia"]), statistics.median(rates["trainer"])
    ratios = [a / b for a, b in zip(rates["tertulia"], rates["trainer"], strict=True)]
    print(f"median tok/s: tertulia {ours:.1f}, transformers Trainer {theirs:.1f}; ratio {ours / theirs:.2f}x")
    print(f"per-round ratios: {', '.join(f'{r:.2f}' for r in ratios)}")


if __name__ == "__main__":
    main()
