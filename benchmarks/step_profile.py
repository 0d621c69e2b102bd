"""Where a decode step's time goes, at 1 and 16 streams: per op, and what is left to Python.

    python benchmarks/step_profile.py [--levels 1 16] [--steps 60] [--base REF]

The engine runs in-process on the embedded model with its defaults (int4 layers, int8 head) and
`level` greedy requests decoding at once. A step is timed three ways:

1. wall time of whole steps, no profiler (the speed);
2. the same steps split into phases: the model's forward and LM head (`runner.decode`), sampling
   (`sampler.sample`), and the rest of the step (scheduling, block bookkeeping);
3. PyTorch's profiler over the model phase: each op's self time, grouped by what it does.

And once per process, the prefill of one long prompt alone (about 1,000 tokens, none from the prefix
cache): the time to its first token.

The profiler adds its own cost to every op it records (a few microseconds, on thousands of ops), so
its op times add up to more than the unprofiled step: read them as shares. What the interpreter
between the ops costs is measured directly where the C++ decode stack exists: the model phase run
with the same ops from Python and from C++, in alternating halves; the difference is the Python.

With `--base REF`, the same measurement also runs on the package as it was at commit REF (unpacked
as in ab.py), in alternating processes, so a change's profile is recorded beside the one before it.
Results go to results/profile.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

RESULT = Path(__file__).parent / "results" / "profile.json"
ROOT = Path(__file__).resolve().parent.parent

# Op name fragments, in order of precedence, and the group they count in.
GROUPS = [
    ("int4pack_mm", "int4 matmuls (120 per token)"),
    ("int4_mm", "int4 matmuls (120 per token)"),
    ("int8pack_mm", "int8 LM head"),
    ("int8_mm", "int8 LM head"),
    ("paged_decode_attention", "attention read in place (decode_attention.cpp)"),
    ("rotary_split", "rotary and KV write (fused)"),
    ("index_select", "KV cache: gather"),
    ("index_copy", "KV cache: write"),
    ("bmm", "attention: matmuls"),
    ("softmax", "attention: softmax"),
    ("rms_norm", "RMSNorm"),
    ("silu", "SiLU"),
    ("embedding", "embedding lookup"),
    ("copy_", "casts and copies"),
    ("_to_copy", "casts and copies"),
    ("clone", "casts and copies"),
    ("contiguous", "casts and copies"),
    ("mul", "multiplies (rotary, SiLU·mul, scale)"),
    ("add", "adds (residual, mask)"),
]
OTHER = "other ops (views, reshapes, tensor creation)"
PROMPTS = [
    "Write a long story about a dragon who learns to paint.",
    "Explain how bread is made, step by step.",
    "Describe a winter morning in Madrid.",
    "Tell me about the history of chess.",
]


def group_of(name: str) -> str:
    for fragment, group in GROUPS:
        if fragment in name:
            return group
    return OTHER


def measure(levels: list[int], steps: int) -> dict:
    """Runs in the process whose `tertulia` is the one measured."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from tertulia.engine.engine import Engine
    from tertulia.engine.sampling import SamplingParams
    from tertulia.models import registry

    model = registry.load()
    engine = Engine(model, quantization="int4", max_batch=max(levels))
    phases: dict[str, float] = defaultdict(float)

    def timed(name, function):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                with record_function(name):
                    return function(*args, **kwargs)
            finally:
                phases[name] += time.perf_counter() - started

        return wrapper

    engine.runner.decode = timed("model", engine.runner.decode)
    engine.sampler.sample = timed("sampling", engine.sampler.sample)
    result = {}
    for level in levels:
        params = SamplingParams(temperature=0, max_tokens=4 * steps + 64, ignore_eos=True)
        sequences = []
        for i in range(level):
            messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)] + f" ({i})"}]
            sequences += engine.add(model.template.encode(messages), params)
        while engine.waiting or engine.prefilling:
            engine.step()
        for _ in range(8):  # warm-up decode steps
            engine.step()
        phases.clear()
        walls = timed_steps(engine, steps)
        phase_ms = {name: 1000 * total / steps for name, total in phases.items()}
        phase_ms["scheduling and bookkeeping"] = 1000 * sum(walls) / steps - sum(phase_ms.values())
        profiled = max(10, steps // 3)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(profiled):
                engine.step()
        ops: dict[str, dict[str, float]] = defaultdict(lambda: {"ms": 0.0, "calls": 0})
        top_level = 0
        for event in prof.events():
            ancestor = event.cpu_parent
            while ancestor is not None and ancestor.name != "model":
                ancestor = ancestor.cpu_parent
            if ancestor is None or event.name == "model":
                continue
            entry = ops[group_of(event.name)]
            entry["ms"] += event.self_cpu_time_total / 1000 / profiled
            entry["calls"] += 1 / profiled
            top_level += event.cpu_parent is ancestor
        python_ms = None
        stack = getattr(engine.runner, "native", None)
        if stack is not None:
            # The same ops from Python and from the C++ stack, in alternating halves: the difference in
            # the model phase is what the interpreter between the ops costs. After the profile, so that
            # both trees profile the same positions.
            model_ms: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(4):
                for use_stack in (False, True):
                    engine.runner.native = stack if use_stack else None
                    phases.clear()
                    timed_steps(engine, steps // 4)
                    model_ms[use_stack].append(1000 * phases["model"] / (steps // 4))
            engine.runner.native = stack
            python_ms = statistics.median(model_ms[False]) - statistics.median(model_ms[True])
        op_ms = sum(entry["ms"] for entry in ops.values())
        step_ms = statistics.median(walls) * 1000
        result[str(level)] = {
            "step_ms_median": step_ms,
            "step_ms_all": [1000 * w for w in walls],
            "tok_s": level / statistics.median(walls),
            "phases_ms": phase_ms,
            "model_ops_ms": {k: round(v["ms"], 4) for k, v in sorted(ops.items(), key=lambda i: -i[1]["ms"])},
            "model_op_calls": {k: round(v["calls"], 1) for k, v in ops.items()},
            "profiled_op_ms": op_ms,
            "ops_called_from_python": top_level / profiled if stack is None else None,
            "python_between_ops_ms": python_ms,
        }
        engine.abort(sequences)
        print(
            f"{level} streams: step {step_ms:.1f} ms ({result[str(level)]['tok_s']:.1f} tok/s); model "
            f"{phase_ms['model']:.1f} ms of which ops {op_ms:.1f} ms, "
            f"{sum(v['calls'] for v in ops.values()):.0f} op calls",
            file=sys.stderr,
            flush=True,
        )
    result["prefill_ms"] = prefill_ms(engine, model)
    result["torch_threads"] = torch.get_num_threads()
    return result


def prefill_ms(engine, model, runs: int = 5) -> list[float]:
    """Time to the first token of one long prompt (about 1,000 tokens, a pasted document), alone: each
    run's prompt starts differently, so nothing comes from the prefix cache."""
    from tertulia.engine.sampling import SamplingParams

    text = " ".join(
        f"Paragraph {i}: the river carried the boats past the old mill and the bridge." for i in range(60)
    )
    times = []
    for run in range(runs):
        prompt = model.template.encode([{"role": "user", "content": f"Run {run}. {text} Summarize."}])
        params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        started = time.perf_counter()
        for _ in engine.generate(prompt, params):
            break
        times.append(1000 * (time.perf_counter() - started))
    return times


def timed_steps(engine, steps: int) -> list[float]:
    walls = []
    for _ in range(steps):
        started = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - started)
    return walls


def in_tree(tree: Path, levels: list[int], steps: int) -> dict:
    """`measure` in a fresh process importing the package from `tree`."""
    env = dict(os.environ, PYTHONPATH=f"{tree}{os.pathsep}{Path(__file__).parent}")
    code = f"import json, step_profile as p; print(json.dumps(p.measure({levels!r}, {steps})))"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=Path(__file__).parent, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    sys.stderr.write(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from ab import unpack
    from machine import describe

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2, help="processes per tree, alternating")
    parser.add_argument("--base", help="also profile the package at this commit")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tertulia-profile-") as temporary:
        trees = {"this tree": ROOT}
        if args.base:
            base_tree = Path(temporary)
            trees = {f"base {unpack(args.base, base_tree)}": base_tree, **trees}
        runs: dict[str, list[dict]] = {name: [] for name in trees}
        for round_ in range(args.rounds):
            order = list(trees) if round_ % 2 == 0 else list(reversed(trees))
            for name in order:
                print(f"round {round_ + 1}: {name}", file=sys.stderr, flush=True)
                runs[name].append(in_tree(trees[name], args.levels, args.steps))
    summary = {name: median_round(rounds, args.levels) for name, rounds in runs.items()}
    for name, rounds in runs.items():
        summary[name]["prefill_ms"] = statistics.median(t for r in rounds for t in r["prefill_ms"])
    record = {
        "machine": describe(),
        "settings": {"levels": args.levels, "steps": args.steps, "rounds": args.rounds, "base": args.base},
        "runs": runs,
        "summary": summary,
    }
    RESULT.write_text(json.dumps(record, indent=2) + "\n")
    for name, by_level in summary.items():
        for level in map(str, args.levels):
            row = by_level[level]
            print(f"{name}, {level} streams: {row['step_ms_median']:.1f} ms/step, {row['tok_s']:.1f} tok/s")
        print(f"{name}: first token of a long prompt in {by_level['prefill_ms']:.0f} ms")
    print(f"wrote {RESULT}")


def median_round(rounds: list[dict], levels: list[int]) -> dict:
    """Per level, the round with the median step time (a whole profile, not a mix of rounds)."""
    chosen = {}
    for level in levels:
        ordered = sorted(rounds, key=lambda r: r[str(level)]["step_ms_median"])
        chosen[str(level)] = ordered[(len(ordered) - 1) // 2][str(level)]
    return chosen


if __name__ == "__main__":
    main()
