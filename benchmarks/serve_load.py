"""Load over HTTP: 1, 4 and 16 concurrent streaming chats, Tertulia vs llama.cpp's `llama-server`.

    python benchmarks/serve_load.py [--levels 1 4 16] [--tokens 64] [--rounds 3]

The peer is llama.cpp's own server at its best for this load: built for this CPU's instruction sets
(benchmarks/llama_cpp.py), continuous batching with as many slots as the highest level, one thread per
core. Tertulia serves with its defaults (int4 for this Q4_1 GGUF, --max-batch 16). Both run on
loopback with the same GGUF and get the same chats: greedy, the end-of-turn tokens banned (so every
reply is `tokens` long on both), timed the same way by this client. Rounds alternate the order of the
servers (ABBA) so drift hits both. Per level: aggregate output tok/s (all tokens over wall time), TTFT
p50/p95 and inter-token latency p50/p95, medians over rounds, and the ratios. Counting is by streamed
content chunks (one per token on both servers). Everything is bounded: `rounds` × `level` requests per
level. Results go to results/serve_load.json.
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
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from tertulia.models import registry

RESULT = Path(__file__).parent / "results" / "serve_load.json"

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


def start(
    command: list[str], url: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen:
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=cwd
    )
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


async def post_events(base: str, body: dict) -> AsyncIterator[bytes]:
    """POST `body` as JSON and yield each server-sent event line as it arrives.

    A plain HTTP/1.1 client on asyncio streams, not httpx: at sixteen streams an httpx client spent
    about four times this one's CPU per token, on the same two cores as the servers being measured.
    What this client spends is recorded with every level ("client cpu ms per token"). Both servers answer
    with chunked transfer encoding; this reads the chunks and splits their data into lines.
    """
    url = urlsplit(base)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    payload = json.dumps(body).encode()
    writer.write(
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
        + payload
    )
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        status = head.split(b" ", 2)[1]
        if status != b"200":
            raise RuntimeError(f"HTTP {status.decode()}: {(await reader.read()).decode()[:300]}")
        if b"chunked" not in head.lower():
            raise RuntimeError("expected a chunked event stream")
        pending = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            if size == 0:
                break
            data = await reader.readexactly(size + 2)
            *lines, pending = (pending + data[:-2]).split(b"\n")
            for line in lines:
                yield line
    finally:
        writer.close()


async def one(base: str, model: str, topic: str, tokens: int) -> Sample:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"Write a long story about {topic}."}],
        "temperature": 0,
        "max_tokens": tokens,
        "logit_bias": {"0": -100, "2": -100},  # <|endoftext|> and <|im_end|>: no early end
        "stream": True,
    }
    started = time.perf_counter()
    sample: Sample | None = None
    last = started
    async for line in post_events(base, body):
        if not line.startswith(b"data: {"):
            continue
        choices = json.loads(line[len(b"data: ") :]).get("choices") or [{}]
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
    cpu = time.process_time()
    for _ in range(rounds):
        started = time.perf_counter()
        batch = await asyncio.gather(
            *(one(base, model, TOPICS[i % len(TOPICS)], tokens) for i in range(concurrency))
        )
        wall += time.perf_counter() - started
        samples += batch
    cpu = time.process_time() - cpu
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
        "client cpu ms per token": 1000 * cpu / max(1, sum(s.tokens for s in samples)),
    }


Runs = dict[str, dict[int, list[dict[str, float]]]]


def alternate(servers: dict[str, tuple[str, str]], levels: list[int], tokens: int, rounds: int) -> Runs:
    """Each level once per round on each server (name -> (base URL, model)), in ABBA order so drift
    in a noisy machine hits all alike; after one short warm-up each."""
    runs: Runs = {name: {n: [] for n in levels} for name in servers}
    for base, model in servers.values():
        asyncio.run(level(base, model, 1, 4, 1))
    for round_number in range(rounds):
        for concurrency in levels:
            order = list(servers) if round_number % 2 == 0 else list(servers)[::-1]
            for name in order:
                base, model = servers[name]
                result = asyncio.run(level(base, model, concurrency, tokens, 1))
                runs[name][concurrency].append(result)
                print(
                    f"round {round_number + 1}, {name} @ {concurrency}: {result['tok/s']:.1f} tok/s",
                    flush=True,
                )
    return runs


def medians_of(runs: Runs) -> dict[str, dict[str, dict[str, float]]]:
    """Per server and level (as text, for JSON), the median of each figure over the rounds."""
    return {
        name: {
            str(n): {key: statistics.median(r[key] for r in rs) for key in rs[0]}
            for n, rs in by_level.items()
        }
        for name, by_level in runs.items()
    }


def shown(command: list[str]) -> str:
    """A command as a reader would type it: file names without their directories, no port."""
    words = [word.rsplit("/", 1)[-1] for word in command]
    at = words.index("--port")
    return " ".join(words[:at] + words[at + 2 :])


def main() -> None:
    from llama_cpp import build, server_command
    from machine import describe

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    _, gguf = registry.resolve("smollm2-135m")
    peer = build(gguf)
    cores = os.cpu_count() or 2
    servers: dict[str, tuple[str, str, subprocess.Popen]] = {}
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "tertulia",
        "serve",
        "--port",
        str(port),
        "--max-batch",
        str(max(args.levels)),
    ]
    servers["tertulia"] = (
        f"http://127.0.0.1:{port}",
        "smollm2-135m",
        start(command, f"http://127.0.0.1:{port}/health"),
    )
    port = free_port()
    command = server_command(gguf, port, parallel=max(args.levels), threads=cores)
    servers["llama-server"] = (
        f"http://127.0.0.1:{port}",
        "smollm2",
        start(command, f"http://127.0.0.1:{port}/health"),
    )
    try:
        endpoints = {name: (base, model) for name, (base, model, _) in servers.items()}
        runs = alternate(endpoints, args.levels, args.tokens, args.rounds)
    finally:
        for _, _, process in servers.values():
            process.terminate()
    medians = medians_of(runs)
    ratios = {
        str(n): medians["tertulia"][str(n)]["tok/s"] / medians["llama-server"][str(n)]["tok/s"]
        for n in args.levels
    }
    record = {
        "machine": describe(),
        "settings": {"levels": args.levels, "tokens": args.tokens, "rounds": args.rounds, "threads": cores},
        "peer": {
            "command": shown(server_command(gguf, 0, parallel=max(args.levels), threads=cores)),
            **peer,
        },
        "runs": {name: {str(n): rs for n, rs in by_level.items()} for name, by_level in runs.items()},
        "medians": medians,
        "ratio_tok_s": ratios,
    }
    RESULT.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\n{args.tokens} tokens per request, greedy, medians of {args.rounds} rounds")
    print("| server | streams | tok/s | TTFT p50 | TTFT p95 | ITL p50 | ITL p95 | × llama-server tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, by_level in medians.items():
        for n, r in by_level.items():
            print(
                f"| {name} | {n} | {r['tok/s']:.1f} | {r['ttft p50']:.2f} s | {r['ttft p95']:.2f} s | "
                f"{1000 * r['itl p50']:.0f} ms | {1000 * r['itl p95']:.0f} ms | "
                f"{r['tok/s'] / medians['llama-server'][n]['tok/s']:.2f}× |"
            )
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
