"""Fine-tuning throughput: `tertulia finetune`'s loop against a plain transformers `Trainer`.

    python benchmarks/finetune.py [--rounds 3] [--epochs 1]

Same model (the embedded default, float32), same data (the identity dataset, assistant-only labels),
same LoRA (r=16, alpha=32, all linear layers), same optimizer and schedule, same machine. Each run is
a fresh process and the two alternate, round after round. The Trainer gets its best recipe for this
data: batches of 8 grouped by length (`train_sampling_strategy="group_by_length"`), padded by
`DataCollatorForSeq2Seq`.

Both sides are timed the same way, steps only: from the first batch's collation to the last
optimizer step (Tertulia sums its steps, from collation to optimizer step; the Trainer is timed by a
callback from `on_train_begin`, after its data loader and optimizer exist, to its last `on_step_end`).
Neither side's model loading, validation or saving is counted. Tokens per second counts real tokens
(padding not counted). Each side's quality is reported with it: its mean training loss, and the loss
on the same held-out examples afterwards, computed the same way (mean negative log-likelihood per
assistant token). Results go to results/finetune.json.
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

from machine import describe

RESULT = Path(__file__).parent / "results" / "finetune.json"

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
        "train_loss": history.epochs[-1]["train_loss"],
        "validation_loss": history.epochs[-1]["val_loss"],
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
        TrainerCallback,
        TrainingArguments,
    )

    from tertulia.models import registry
    from tertulia.train.batches import IGNORE, tokenize
    from tertulia.train.data import validate

    _, directory = registry.model_directory()
    text = registry.load_text_side()
    end_of_turn = sorted(text.tokenizer.end_of_turn_ids())
    examples = [tokenize(e.messages, text.template, end_of_turn) for e in validate(train).examples]
    held_out = [
        tokenize(e.messages, text.template, end_of_turn)
        for e in validate(train.with_name("validation.jsonl")).examples
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
        train_sampling_strategy="group_by_length",
    )

    class StepClock(TrainerCallback):
        """From the start of training (loader and optimizer made) to the last optimizer step."""

        started = ended = 0.0

        def on_train_begin(self, *args, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            self.ended = time.perf_counter()

    clock = StepClock()
    trainer = Trainer(
        model=model,
        args=arguments,
        train_dataset=Dataset.from_dict(rows),
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding="longest"),
        callbacks=[clock],
    )
    output = trainer.train()
    return {
        "tokens": epochs * sum(len(e.ids) for e in examples),
        "seconds": clock.ended - clock.started,
        "train_loss": output.training_loss,
        "validation_loss": assistant_loss(model, held_out),
    }


def assistant_loss(model, examples) -> float:
    """Mean negative log-likelihood per assistant token, as Tertulia's validation computes it."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for example in examples:
            ids = torch.tensor([example.ids])
            logits = model(input_ids=ids).logits[0, :-1].float()
            targets = torch.tensor(example.ids[1:])
            trained = torch.tensor(example.trained[1:])
            losses = F.cross_entropy(logits, targets, reduction="none")[trained]
            total += float(losses.sum())
            count += int(trained.sum())
    return total / max(count, 1)


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
    runs: dict[str, list[dict[str, float]]] = {"tertulia": [], "trainer": []}
    for round_number in range(1, args.rounds + 1):
        order = ("tertulia", "trainer") if round_number % 2 else ("trainer", "tertulia")
        for worker in order:
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
            result["tok/s"] = result["tokens"] / result["seconds"]
            runs[worker].append(result)
            print(
                f"round {round_number} {worker:9} {result['tok/s']:6.1f} tok/s  ({result['tokens']} tokens "
                f"in {result['seconds']:.0f} s, train loss {result['train_loss']:.3f}, held-out loss "
                f"{result['validation_loss']:.3f})",
                flush=True,
            )
    medians = {
        worker: {key: statistics.median(r[key] for r in results) for key in results[0]}
        for worker, results in runs.items()
    }
    ratio = medians["tertulia"]["tok/s"] / medians["trainer"]["tok/s"]
    record = {
        "machine": describe(),
        "settings": {
            "rounds": args.rounds,
            "epochs": args.epochs,
            "lora": LORA,
            "lr": LR,
            "trainer": "batches of 8, group_by_length, DataCollatorForSeq2Seq",
        },
        "runs": runs,
        "medians": medians,
        "ratio_tok_s": ratio,
    }
    RESULT.write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"median tok/s: tertulia {medians['tertulia']['tok/s']:.1f}, transformers Trainer "
        f"{medians['trainer']['tok/s']:.1f}; ratio {ratio:.2f}x; wrote {RESULT}"
    )


if __name__ == "__main__":
    main()
