"""Perplexity tokens/s: `tertulia eval perplexity` against lm-evaluation-harness's transformers backend.

    python benchmarks/eval_perplexity.py [--rounds 3]

Both score the same documents with the same method (rolling log-likelihood, windows of the model's
context, 8,192 tokens) and the same weights (the embedded model's HF-format export), in this one
process, rounds interleaved. The harness runs as a user would run it on a CPU: `HFLM` with float32
and batch size 1 (its default), its `loglikelihood_rolling` timed alone (model loading excluded on
both sides). Tertulia runs at float32 (the same precision) and at int4 (how it serves the embedded
model by default). Two texts: one long document (Genesis 1-4, 3,430 tokens) and many short ones (the
199 everyday-chat conversations as plain text). Writes benchmarks/results/eval_perplexity.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

from tertulia.eval.files import read_conversations
from tertulia.eval.perplexity import document_perplexity
from tertulia.eval.suite import DATA
from tertulia.models import registry
from tertulia.providers.local import LocalProvider

try:
    from benchmarks.machine import describe
except ImportError:  # run as a script from the benchmarks folder
    from machine import describe  # type: ignore[no-redef]

RESULT = Path(__file__).parent / "results" / "eval_perplexity.json"


def texts() -> dict[str, list[str]]:
    chats = read_conversations(DATA / "everyday-chat.jsonl")
    return {
        "one long document": [(DATA / "genesis.txt").read_text(encoding="utf-8")],
        "199 short documents": ["\n".join(m["content"] for m in chat) for chat in chats],
    }


def harness(directory: Path):  # type: ignore[no-untyped-def]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model = HFLM(pretrained=str(directory), dtype="float32", batch_size=1, device="cpu")

    def score(documents: list[str]) -> float:
        requests = [
            Instance("loglikelihood_rolling", {}, (text,), i, ("bench", i, 1))
            for i, text in enumerate(documents)
        ]
        return sum(model.loglikelihood_rolling(requests, disable_tqdm=True))

    return score


def ours(quantization: str):  # type: ignore[no-untyped-def]
    provider = LocalProvider.load("smollm2-135m", quantization=quantization, inline=True)

    def score(documents: list[str]) -> float:
        return asyncio.run(document_perplexity(provider, documents)).loglikelihood

    return score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    _, directory = registry.model_directory()
    sides = {
        "tertulia float32": ours("none"),
        "tertulia int4": ours("int4"),
        "lm-eval hf float32": harness(directory),
    }
    text_side = registry.load_text_side("smollm2-135m")
    sets = texts()
    tokens = {name: sum(len(text_side.tokenizer.encode(d)) for d in docs) for name, docs in sets.items()}
    seconds: dict[str, dict[str, list[float]]] = {t: {s: [] for s in sides} for t in sets}
    loglikelihoods: dict[str, dict[str, float]] = {t: {} for t in sets}
    for name, documents in sets.items():
        for score in sides.values():
            score(documents[:2])  # warm-up: first calls, thread pools
        for round_number in range(args.rounds):
            for side, score in sides.items():
                started = time.perf_counter()
                loglikelihoods[name][side] = score(documents)
                seconds[name][side].append(time.perf_counter() - started)
                rate = tokens[name] / seconds[name][side][-1]
                print(f"{name} · round {round_number + 1} · {side}: {rate:.0f} tok/s")
    rates = {
        name: {side: tokens[name] / statistics.median(times) for side, times in by_side.items()}
        for name, by_side in seconds.items()
    }
    ratios = {
        name: {
            "float32": by_side["tertulia float32"] / by_side["lm-eval hf float32"],
            "int4 vs harness float32": by_side["tertulia int4"] / by_side["lm-eval hf float32"],
        }
        for name, by_side in rates.items()
    }
    for name in sets:
        print(
            f"{name} ({tokens[name]} tokens): "
            + ", ".join(f"{s} {r:.0f} tok/s" for s, r in rates[name].items())
        )
        print(f"  ratio, same precision: {ratios[name]['float32']:.2f}x")
    RESULT.parent.mkdir(exist_ok=True)
    RESULT.write_text(
        json.dumps(
            {
                "machine": describe(),
                "settings": {"rounds": args.rounds, "window": text_side.context},
                "tokens": tokens,
                "seconds": seconds,
                "tokens_per_second": rates,
                "ratios": ratios,
                "loglikelihood": loglikelihoods,
            },
            indent=1,
        )
    )
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
