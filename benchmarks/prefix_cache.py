"""What the prefix cache saves: time to first token with a long shared system prompt.

    python benchmarks/prefix_cache.py [--runs 5]

Several users ask different questions under the same long system prompt (a persona, instructions,
documents). With the prefix cache, the system prompt's blocks are computed once and reused; without
it, every request prefills it again. Prints median time to first token for both, and the ratio, and
writes them with every run to benchmarks/results/prefix_cache.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from tertulia.engine.engine import Engine
from tertulia.engine.sampling import SamplingParams
from tertulia.models import registry

try:
    from benchmarks.machine import describe
except ImportError:  # run as a script from the benchmarks folder
    from machine import describe  # type: ignore[no-redef]

RESULT = Path(__file__).parent / "results" / "prefix_cache.json"

SYSTEM = (
    "You are Tertulia, a patient assistant for a public library in Madrid. "
    + "Answer briefly, cite the catalogue section, and offer to reserve the book. " * 40
)
QUESTIONS = [
    "Do you have books about dragons?",
    "Where can I find poetry by Lorca?",
    "What are your opening hours?",
    "Can I borrow an e-book?",
    "Is there a section for children?",
    "How do I renew a loan?",
]


def first_token_seconds(engine: Engine, prompt: list[int]) -> float:
    started = time.perf_counter()
    stream = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=1))
    next(stream)
    stream.close()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    model = registry.load()
    prompts = [
        model.template.encode([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
        for q in QUESTIONS
    ]
    engines = {
        "prefix cache": Engine(model, quantization="int4", max_batch=4),
        "no prefix cache": Engine(model, quantization="int4", max_batch=4, prefix_cache=False),
    }
    for engine in engines.values():
        first_token_seconds(engine, prompts[0])  # warm up; with the cache, this computes the prefix
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.runs):
        for prompt in prompts[1:]:
            for name, engine in engines.items():
                times[name].append(first_token_seconds(engine, prompt))
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"prompt: {len(prompts[1])} tokens, of which the shared system prompt is most")
    for name, value in medians.items():
        print(f"{name:>16}: time to first token {value * 1000:.0f} ms (median of {len(times[name])})")
    ratio = medians["no prefix cache"] / medians["prefix cache"]
    print(f"ratio: {ratio:.1f}x faster with the cache")
    RESULT.parent.mkdir(exist_ok=True)
    RESULT.write_text(
        json.dumps(
            {
                "machine": describe(),
                "settings": {"runs": args.runs, "questions": len(QUESTIONS) - 1, "quantization": "int4"},
                "prompt_tokens": len(prompts[1]),
                "seconds": times,
                "median_seconds": medians,
                "ratio": ratio,
            },
            indent=1,
        )
    )
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
