"""Prometheus metrics at /metrics: requests, tokens, latency histograms, queue, batch and KV usage."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from tertulia.providers.base import EngineLoad, Provider, ReplyObserver

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tertulia_requests", "Requests received", ["model", "endpoint"], registry=self.registry
        )
        self.prompt_tokens = Counter(
            "tertulia_prompt_tokens", "Prompt tokens processed", ["model"], registry=self.registry
        )
        self.generation_tokens = Counter(
            "tertulia_generation_tokens", "Tokens generated", ["model"], registry=self.registry
        )
        self.ttft = Histogram(
            "tertulia_time_to_first_token_seconds",
            "From request to first token",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "tertulia_inter_token_latency_seconds",
            "Between consecutive tokens of a sequence",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._queue = Gauge("tertulia_queue_depth", "Requests waiting", ["model"], registry=self.registry)
        self._running = Gauge(
            "tertulia_running_sequences", "Sequences being decoded", ["model"], registry=self.registry
        )
        self._kv = Gauge(
            "tertulia_kv_cache_usage_ratio",
            "Share of the KV-cache memory budget in use",
            ["model"],
            registry=self.registry,
        )
        self._prefix_hits = Gauge(
            "tertulia_prefix_cache_hit_tokens",
            "Prompt tokens reused from the prefix cache since start",
            ["model"],
            registry=self.registry,
        )
        self._preemptions = Gauge(
            "tertulia_preemptions",
            "Sequences preempted for KV memory since start",
            ["model"],
            registry=self.registry,
        )

    def watch(self, model: Provider) -> None:
        """Gauges read the model's engine when scraped (providers without one report none); timings
        arrive from the engine thread."""
        if model.engine_load() is None:
            return
        readings: list[tuple[Gauge, Callable[[EngineLoad], float]]] = [
            (self._queue, lambda load: load.waiting),
            (self._running, lambda load: load.running),
            (self._kv, lambda load: load.kv_used),
            (self._prefix_hits, lambda load: load.prefix_hit_tokens),
            (self._preemptions, lambda load: load.preemptions),
        ]
        for gauge, read in readings:
            gauge.labels(model.name).set_function(partial(_reading, model, read))
        model.observe(_ModelObserver(self, model.name))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _reading(model: Provider, read: Callable[[EngineLoad], float]) -> float:
    load = model.engine_load()
    return read(load) if load is not None else 0.0


class _ModelObserver(ReplyObserver):
    def __init__(self, metrics: Metrics, model: str) -> None:
        self._ttft = metrics.ttft.labels(model)
        self._itl = metrics.itl.labels(model)
        self._prompt = metrics.prompt_tokens.labels(model)
        self._generated = metrics.generation_tokens.labels(model)

    def first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def next_token(self, seconds: float) -> None:
        self._itl.observe(seconds)

    def finished(self, prompt_tokens: int, completion_tokens: int) -> None:
        self._prompt.inc(prompt_tokens)
        self._generated.inc(completion_tokens)
