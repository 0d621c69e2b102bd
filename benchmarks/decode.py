"""Engine decode speed against Hugging Face transformers at the same precision, in one run.

    python benchmarks/decode.py [--tokens 128] [--rounds 5] [--skip-quality]

Both sides decode the same chat prompt greedily, one stream, and are timed the same way: a timestamp
as each new token arrives (Tertulia's `generate` yields it; transformers hands it to a streamer), and
decode tok/s is the tokens after the first over the time after the first, so prefill is excluded.
Two precisions, each against its own peer:

- float32: Tertulia's engine with `quantization="none"` against transformers' `generate` in float32;
- int4 weights (Tertulia's default for this Q4_1 GGUF): the engine against transformers with every
  decoder projection replaced by PyTorch's own int4 weight-only kernel
  (`aten._weight_int4pack_mm_for_cpu`, groups of 32, bf16 activations) and the LM head by its int8
  weight-only kernel (`aten._weight_int8pack_mm`): the same weights and kernels the engine uses, the
  model's code around them being transformers'.

Rounds interleave the peers so machine drift hits all alike; medians are reported. Also recorded: the
warm start of `tertulia chat -p` (a fresh process to its first byte of answer) and the held-out
perplexity of each of the engine's quantization modes (chatterbot-corpus, when installed). Results go
to results/decode.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from machine import describe

from tertulia.engine.engine import Engine
from tertulia.engine.quant import Int4Linear, Int8Linear
from tertulia.engine.sampling import SamplingParams
from tertulia.models import registry

PROMPT = [{"role": "user", "content": "Write a long story about a dragon who learns to paint."}]
RESULT = Path(__file__).parent / "results" / "decode.json"


def rate(stamps: list[float]) -> float:
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def tertulia_runner(quantization: str):
    model = registry.load()
    engine = Engine(model, quantization=quantization, max_batch=1)
    prompt = model.template.encode(PROMPT)

    def run(tokens: int) -> float:
        params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        return rate([time.perf_counter() for _ in engine.generate(prompt, params)])

    return run


def low_precision(model: torch.nn.Module) -> None:
    """transformers' module with PyTorch's int4 weight-only projections and an int8 weight-only head."""
    for layer in model.model.layers:
        for owner, names in (
            (layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
            (layer.mlp, ("gate_proj", "up_proj", "down_proj")),
        ):
            for name in names:
                setattr(owner, name, Int4Linear.quantize(getattr(owner, name), own=False))
    model.lm_head = Int8Linear.quantize(model.lm_head)


def transformers_runner(gguf: Path, precision: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    if precision == "int4":
        low_precision(model)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids

    class Stamps(BaseStreamer):
        """Called with the prompt first, then with each new token."""

        def __init__(self) -> None:
            self.calls: list[float] = []

        def put(self, value: torch.Tensor) -> None:
            self.calls.append(time.perf_counter())

        def end(self) -> None:
            pass

    def run(tokens: int) -> float:
        streamer = Stamps()
        with torch.inference_mode():
            model.generate(
                ids,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=2,
                streamer=streamer,
            )
        return rate(streamer.calls[1:])

    return run


def warm_start(runs: int) -> list[float]:
    """Seconds from launching `tertulia chat -p` to its first byte of answer on stdout."""
    command = [
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
    ]
    subprocess.run(command, capture_output=True, check=True)  # the caches are warm from here on
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
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
    from tertulia.eval.perplexity import token_logprobs
    from tertulia.providers.local import LocalProvider

    result = {}
    for mode in quant.MODES:
        model = registry.load()
        sequences = held_out_chats(model)
        if not sequences:
            return {}
        provider = LocalProvider.of_model(model, quantization=mode, max_batch=1, inline=True)
        window = provider.context_length or 2048
        # Every token of each chat after its first, given all before it.
        scores = [
            s for ids in sequences for s in asyncio.run(token_logprobs(provider, ids[1:], ids[0], window))
        ]
        result[mode] = math.exp(-sum(scores) / len(scores))
    return result


PAIRS = {
    "float32": ("tertulia fp32", "transformers fp32"),
    "int4 weights": ("tertulia int4", "transformers int4"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    # First, while this process holds no model and no torch threads of its own that could compete.
    startup = warm_start(5)
    _, gguf = registry.resolve("smollm2-135m")
    peers = {
        "tertulia int4": tertulia_runner("int4"),
        "transformers int4": transformers_runner(gguf, "int4"),
        "tertulia fp32": tertulia_runner("none"),
        "transformers fp32": transformers_runner(gguf, "fp32"),
    }
    speeds: dict[str, list[float]] = {name: [] for name in peers}
    for run in peers.values():
        run(16)  # warm-up
    for round_ in range(args.rounds):
        order = list(peers) if round_ % 2 == 0 else list(reversed(peers))
        for name in order:
            speeds[name].append(peers[name](args.tokens))
        print(
            f"round {round_ + 1}/{args.rounds}: " + ", ".join(f"{n} {s[-1]:.1f}" for n, s in speeds.items())
        )
    medians = {name: statistics.median(values) for name, values in speeds.items()}
    ratios = {label: medians[ours] / medians[theirs] for label, (ours, theirs) in PAIRS.items()}
    perplexities = {} if args.skip_quality else quality()
    record = {
        "machine": describe(),
        "settings": {"tokens": args.tokens, "rounds": args.rounds, "model": "smollm2-135m (Q4_1 GGUF)"},
        "runs": speeds,
        "medians": medians,
        "pairs": PAIRS,
        "ratios": ratios,
        "warm_start_seconds": startup,
        "perplexity": perplexities,
    }
    RESULT.write_text(json.dumps(record, indent=2) + "\n")
    print("\n| precision | Tertulia tok/s | transformers tok/s | ratio |\n|---|---|---|---|")
    for label, (ours, theirs) in PAIRS.items():
        print(f"| {label} | {medians[ours]:.1f} | {medians[theirs]:.1f} | {ratios[label]:.2f}× |")
    print(f"warm start of `tertulia chat -p`: median {statistics.median(startup):.2f} s")
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
