"""Single-stream decode speed: Tertulia vs HF transformers vs llama.cpp, same model, same run.

    python benchmarks/decode.py [--tokens 128] [--runs 5]

Greedy decoding of the same chat prompt; decode tok/s counts the tokens after the first over the time
after the first (prefill excluded). Runs are interleaved (one of each peer per round) so machine noise
hits all of them alike; medians are reported with the ratios. Also: startup to first token of
`tertulia chat -p` in a fresh process (warm cache), and the perplexity cost of each quantization on
held-out chat text (chatterbot-corpus, English and Spanish, when installed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from tertulia.engine.engine import Engine
from tertulia.engine.sampling import SamplingParams
from tertulia.models import registry

PROMPT = [{"role": "user", "content": "Write a long story about a dragon who learns to paint."}]
RESULTS = Path(__file__).parent / "results"


def tertulia_runner(quantization: str):
    model = registry.load()
    engine = Engine(model, quantization=quantization, max_batch=1)
    prompt = model.template.encode(PROMPT)

    def run(tokens: int) -> float:
        stamps = []
        for _ in engine.generate(prompt, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)):
            stamps.append(time.perf_counter())
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])

    return run


def transformers_runner(gguf: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    load_seconds = time.perf_counter() - started
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids

    def timed(new_tokens: int) -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=2
            )
        return time.perf_counter() - started

    def run(tokens: int) -> float:
        return (tokens - 1) / (timed(tokens) - timed(1))

    return run, load_seconds


def llama_cpp_runner(gguf: Path):
    try:
        from llama_cpp import Llama
    except ImportError:
        return None, None
    started = time.perf_counter()
    llm = Llama(model_path=str(gguf), n_threads=os.cpu_count() or 2, n_ctx=2048, verbose=False)
    load_seconds = time.perf_counter() - started
    model = registry.load()
    prompt = model.template.encode(PROMPT)

    def run(tokens: int) -> float:
        llm.reset()
        stamps = []
        for _ in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == tokens:
                break
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])

    return run, load_seconds


def startup_to_first_token(runs: int) -> list[float]:
    """Seconds from launching `tertulia chat -p` to its first byte of answer on stdout."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tertulia",
                "chat",
                "-p",
                "Hi!",
                "--temperature",
                "0",
                "--max-tokens",
                "8",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert proc.stdout is not None
        proc.stdout.read(1)
        times.append(time.perf_counter() - started)
        proc.wait()
    return times


def held_out_chats(model) -> list[list[int]]:
    """Chat-formatted dialogues from chatterbot-corpus (English + Spanish), if the package is present."""
    import importlib.util

    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(spec.submodule_search_locations[0]) / "data"
    sequences = []
    for language in ("english", "spanish"):
        for file in sorted((root / language).glob("*.yml")):
            for dialogue in (yaml.safe_load(file.read_text()) or {}).get("conversations", [])[:15]:
                turns = [str(t) for t in dialogue]
                if len(turns) < 2:
                    continue
                messages = [
                    {"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)
                ]
                sequences.append(model.template.encode(messages, add_generation_prompt=False))
    return sequences


def quality() -> dict[str, float]:
    import asyncio

    from tertulia.engine import quant
    from tertulia.eval.perplexity import perplexity
    from tertulia.providers.local import LocalProvider

    result = {}
    for mode in quant.MODES:
        model = registry.load()
        sequences = held_out_chats(model)
        if not sequences:
            return {}
        provider = LocalProvider.of_model(model, quantization=mode, max_batch=1, inline=True)
        result[mode] = asyncio.run(perplexity(provider, sequences))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    _, gguf = registry.resolve("smollm2-135m")

    print(f"torch threads: {torch.get_num_threads()}, cpu count: {os.cpu_count()}", flush=True)
    peers = {
        "tertulia int4 (default)": tertulia_runner("int4"),
        "tertulia int8": tertulia_runner("int8"),
        "tertulia fp32": tertulia_runner("none"),
    }
    hf_run, hf_load = transformers_runner(gguf)
    peers["transformers fp32"] = hf_run
    cpp_run, cpp_load = llama_cpp_runner(gguf)
    if cpp_run:
        peers["llama.cpp Q4_1"] = cpp_run
    else:
        print("llama-cpp-python is not installed: skipping that peer (make bench installs it).")
    speeds: dict[str, list[float]] = {name: [] for name in peers}
    for run in peers.values():
        run(16)  # warm-up
    for round_ in range(args.runs):
        for name, run in peers.items():
            speeds[name].append(run(args.tokens))
        print(
            f"round {round_ + 1}/{args.runs}: " + ", ".join(f"{n} {s[-1]:.1f}" for n, s in speeds.items()),
            flush=True,
        )
    medians = {name: statistics.median(values) for name, values in speeds.items()}
    startup = startup_to_first_token(3)
    ppl = {} if args.skip_quality else quality()

    print(f"\nSingle-stream greedy decode, {args.tokens} tokens, median of {args.runs} interleaved runs")
    print("| engine | decode tok/s | × transformers | × llama.cpp |")
    print("|---|---|---|---|")
    for name, value in medians.items():
        hf_ratio = value / medians["transformers fp32"]
        cpp = f"{value / medians['llama.cpp Q4_1']:.2f}×" if "llama.cpp Q4_1" in medians else "n/a"
        print(f"| {name} | {value:.1f} | {hf_ratio:.2f}× | {cpp} |")
    print(
        f"\nStartup to first token (tertulia chat -p, fresh process, warm cache): "
        f"median {statistics.median(startup):.2f} s ({', '.join(f'{s:.2f}' for s in startup)})"
    )
    print(
        f"Load time: transformers from GGUF {hf_load:.1f} s"
        + (f", llama.cpp {cpp_load:.2f} s" if cpp_load else "")
    )
    if ppl:
        print("\nPerplexity on held-out chats (chatterbot-corpus en+es):")
        for mode, value in ppl.items():
            print(f"| {mode} | {value:.3f} | {100 * (value / ppl['none'] - 1):+.2f}% |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "decode.json").write_text(
        json.dumps({"speeds": speeds, "medians": medians, "startup": startup, "perplexity": ppl}, indent=2)
    )


if __name__ == "__main__":
    main()
