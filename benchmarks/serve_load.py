"""Load over HTTP: 1, 4 and 16 concurrent streaming chats, Tertulia vs llama-cpp-python's server.

    python benchmarks/serve_load.py [--levels 1 4 16] [--tokens 64] [--rounds 2]

Both servers run on loopback with the same GGUF, and get the same prompts (greedy, max_tokens).
For each concurrency level it prints aggregate output tok/s (all tokens over wall time), TTFT p50/p95
and inter-token latency p50/p95, for each server, and the ratio. Counting is by streamed content
chunks (one per token on both servers). Everything is bounded: `rounds` × `level` requests per level.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx

from tertulia.models import registry

TOPICS = [
    "dragons",
    "the sea",
    "coffee",
    "Madrid",
    "robots",
    "music",
    "winter",
    "cats",
    "rivers",
    "bread",
    "chess",
    "the moon",
    "trains",
    "gardens",
    "Python",
    "friendship",
]


@dataclass
class Sample:
    ttft: float
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], url: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"{command[:4]} did not start")


async def one(client: httpx.AsyncClient, base: str, model: str, topic: str, tokens: int) -> Sample:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"Write a long story about {topic}."}],
        "temperature": 0,
        "max_tokens": tokens,
        "stream": True,
    }
    started = time.perf_counter()
    sample: Sample | None = None
    last = started
    async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line[len("data: ") :]).get("choices") or [{}]
            if not (choices[0].get("delta") or {}).get("content"):
                continue  # the role chunk, finish chunk or usage chunk: not a token
            now = time.perf_counter()
            if sample is None:
                sample = Sample(ttft=now - started)
            else:
                sample.gaps.append(now - last)
            sample.tokens += 1
            last = now
    assert sample is not None, "no tokens streamed"
    return sample


async def level(base: str, model: str, concurrency: int, tokens: int, rounds: int) -> dict[str, float]:
    samples: list[Sample] = []
    wall = 0.0
    async with httpx.AsyncClient(timeout=600) as client:
        for _ in range(rounds):
            started = time.perf_counter()
            batch = await asyncio.gather(
                *(one(client, base, model, TOPICS[i % len(TOPICS)], tokens) for i in range(concurrency))
            )
            wall += time.perf_counter() - started
            samples += batch
    ttfts = sorted(s.ttft for s in samples)
    gaps = sorted(g for s in samples for g in s.gaps)

    def pct(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    return {
        "tok/s": sum(s.tokens for s in samples) / wall,
        "ttft p50": statistics.median(ttfts),
        "ttft p95": pct(ttfts, 0.95),
        "itl p50": pct(gaps, 0.5),
        "itl p95": pct(gaps, 0.95),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    _, gguf = registry.resolve("smollm2-135m")
    servers: dict[str, tuple[str, str, subprocess.Popen]] = {}
    port = free_port()
    servers["tertulia"] = (
        f"http://127.0.0.1:{port}",
        "smollm2-135m",
        start(
            [sys.executable, "-m", "tertulia", "serve", "--port", str(port), "--max-batch", "16"],
            f"http://127.0.0.1:{port}/health",
        ),
    )
    try:
        import llama_cpp.server  # noqa: F401

        port = free_port()
        servers["llama.cpp server"] = (
            f"http://127.0.0.1:{port}",
            "smollm2",
            start(
                [
                    sys.executable,
                    "-m",
                    "llama_cpp.server",
                    "--model",
                    str(gguf),
                    "--model_alias",
                    "smollm2",
                    "--n_threads",
                    str(os.cpu_count() or 2),
                    "--n_ctx",
                    "8192",
                    "--port",
                    str(port),
                    # By default a new request interrupts the running one; queue them instead.
                    "--interrupt_requests",
                    "False",
                ],
                f"http://127.0.0.1:{port}/v1/models",
            ),
        )
    except ImportError:
        print("llama-cpp-python[server] is not installed: measuring Tertulia alone.")
    try:
        results: dict[tuple[str, int], dict[str, float]] = {}
        for concurrency in args.levels:
            for name, (base, model, _) in servers.items():
                asyncio.run(level(base, model, 1, 4, 1))  # warm-up
                results[name, concurrency] = asyncio.run(
                    level(base, model, concurrency, args.tokens, args.rounds)
                )
                print(f"{name} @ {concurrency}: {results[name, concurrency]}", flush=True)
        print(f"\n{args.tokens} tokens per request, greedy, {args.rounds} rounds per level")
        print("| server | streams | tok/s | TTFT p50 | TTFT p95 | ITL p50 | ITL p95 | × llama.cpp tok/s |")
        print("|---|---|---|---|---|---|---|---|")
        for (name, concurrency), r in results.items():
            peer = results.get(("llama.cpp server", concurrency))
            ratio = f"{r['tok/s'] / peer['tok/s']:.2f}×" if peer else "n/a"
            print(
                f"| {name} | {concurrency} | {r['tok/s']:.1f} | {r['ttft p50']:.2f} s | "
                f"{r['ttft p95']:.2f} s | {1000 * r['itl p50']:.0f} ms | "
                f"{1000 * r['itl p95']:.0f} ms | {ratio} |"
            )
    finally:
        for _, _, process in servers.values():
            process.terminate()
            process.wait(30)


if __name__ == "__main__":
    main()
