"""JSON mode: how often the default model's reply is one parsable JSON object within a token budget.

    python benchmarks/json_mode.py [--max-tokens 300] [--seeds 5]

Asks the embedded model for JSON (English and Spanish prompts), greedy and sampled at temperature 1.0
with fixed seeds, `response_format: json_object`, through the engine as the server runs it (int4,
batched). Two variants run in the same process on the same prompts and seeds:

- "grammar only": the JSON grammar masks tokens, and nothing else;
- "finishing": the grammar closes what it opened when the budget runs out, and bounds runaway
  repetition inside strings (what Tertulia serves).

Writes benchmarks/results/json_mode.json (rates, finish reasons, examples of failures, the machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from tertulia.engine import engine as engine_module
from tertulia.engine.engine import Engine
from tertulia.engine.json_mode import JsonConstraint
from tertulia.engine.sampling import SamplingParams
from tertulia.models import registry

try:
    from benchmarks.machine import describe
except ImportError:  # run as a script from the benchmarks folder
    from machine import describe  # type: ignore[no-redef]

RESULTS = Path(__file__).parent / "results"
PROMPTS = [
    "Describe a cat as a JSON object with its name and age.",
    "Give me a JSON object describing a book: title, author, year and genres.",
    "Return a JSON object with three European countries and their capitals.",
    "Create a JSON user profile with name, email, age and a list of hobbies.",
    "Write a recipe for pancakes as JSON, with ingredients and steps.",
    "List the planets of the solar system in a JSON object.",
    "Describe a movie as JSON: title, director, year and cast.",
    "Output a JSON object with the weather forecast for the next three days.",
    "Describe tu ciudad favorita en un objeto JSON con nombre, país y población.",
    "Dame un objeto JSON con tres frutas y su color.",
    "Crea un objeto JSON que describa un coche: marca, modelo, año y precio.",
    "Escribe una lista de la compra como objeto JSON, con cantidades.",
]
VARIANTS = {"grammar only": False, "finishing": True}


def parses(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def run_variant(model, finishing: bool, max_tokens: int, seeds: int, progress: Progress, label: str) -> dict:
    original = engine_module.JsonConstraint
    engine_module.JsonConstraint = lambda grammar: JsonConstraint(grammar, finishing=finishing)  # type: ignore[misc]
    try:
        engine = Engine(model, quantization="int4", max_batch=16)
        requests = []
        for prompt in PROMPTS:
            ids = model.template.encode([{"role": "user", "content": prompt}])
            settings = [("greedy", SamplingParams(temperature=0, max_tokens=max_tokens, json_object=True))]
            settings += [
                (
                    f"seed {s}",
                    SamplingParams(temperature=1.0, seed=s, max_tokens=max_tokens, json_object=True),
                )
                for s in range(seeds)
            ]
            for name, params in settings:
                requests.append((prompt, name, engine.add(ids, params)[0]))
        task = progress.add_task(label, total=len(requests))
        started = time.perf_counter()
        while engine.has_work:
            engine.step()
            progress.update(task, completed=sum(seq.finish_reason is not None for _, _, seq in requests))
        seconds = time.perf_counter() - started
    finally:
        engine_module.JsonConstraint = original  # type: ignore[misc]
    replies = [
        {
            "prompt": prompt,
            "sampling": name,
            "text": seq.text,
            "tokens": len(seq.output),
            "finish_reason": seq.finish_reason,
            "parses": parses(seq.text),
        }
        for prompt, name, seq in requests
    ]
    return summarize(replies, seconds)


def summarize(replies: list[dict], seconds: float) -> dict:
    def rate(rows: list[dict]) -> float:
        return sum(r["parses"] for r in rows) / len(rows)

    greedy = [r for r in replies if r["sampling"] == "greedy"]
    sampled = [r for r in replies if r["sampling"] != "greedy"]
    reasons: dict[str, int] = {}
    for r in replies:
        reasons[r["finish_reason"]] = reasons.get(r["finish_reason"], 0) + 1
    length = [r for r in replies if r["finish_reason"] == "length"]
    return {
        "replies": len(replies),
        "parse_rate": rate(replies),
        "parse_rate_greedy": rate(greedy),
        "parse_rate_sampled": rate(sampled),
        "parse_rate_when_cut": rate(length) if length else None,
        "finish_reasons": reasons,
        "median_tokens": statistics.median(r["tokens"] for r in replies),
        "seconds": seconds,
        "failures": [r for r in replies if not r["parses"]][:5],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-tokens", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=5, help="sampled replies per prompt (temperature 1.0)")
    args = parser.parse_args()
    model = registry.load()
    results = {}
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns) as progress:
        for label, finishing in VARIANTS.items():
            results[label] = run_variant(model, finishing, args.max_tokens, args.seeds, progress, label)
    print(
        f"\nJSON mode, {len(PROMPTS)} prompts x (greedy + {args.seeds} seeds), max_tokens={args.max_tokens}"
    )
    print(f"{'variant':<14} {'parses':>7} {'greedy':>7} {'sampled':>8} {'cut, parses':>12}  finish reasons")
    for label, r in results.items():
        cut = "-" if r["parse_rate_when_cut"] is None else f"{r['parse_rate_when_cut']:.0%}"
        print(
            f"{label:<14} {r['parse_rate']:>7.0%} {r['parse_rate_greedy']:>7.0%} "
            f"{r['parse_rate_sampled']:>8.0%} {cut:>12}  {r['finish_reasons']}"
        )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "json_mode.json"
    settings = {
        "max_tokens": args.max_tokens,
        "seeds": args.seeds,
        "prompts": PROMPTS,
        "quantization": "int4",
    }
    out.write_text(json.dumps({"machine": describe(), "settings": settings, "variants": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
