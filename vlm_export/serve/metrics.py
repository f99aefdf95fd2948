"""Prometheus metrics (`GET /metrics`): requests, queue depth, batch size, tokens, TTFT and per-token latency.

Each app has its own `CollectorRegistry`, so several apps (tests, Ray replicas in one process) never collide.
prometheus_client is thread-safe: the engine thread updates these directly.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "vlm_serve_requests", "Finished chat completion requests by outcome", ["outcome"], registry=r
        )
        self.queue_depth = Gauge("vlm_serve_queue_depth", "Requests waiting to join the batch", registry=r)
        self.running = Gauge("vlm_serve_running", "Sequences in the running batch", registry=r)
        self.prompt_tokens = Counter("vlm_serve_prompt_tokens", "Prompt tokens prefilled (vision included)", registry=r)
        self.generation_tokens = Counter("vlm_serve_generation_tokens", "Tokens generated", registry=r)
        self.batch_size = Histogram(
            "vlm_serve_batch_size", "Sequences per decode step", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r
        )
        self.ttft = Histogram(
            "vlm_serve_time_to_first_token_seconds",
            "From the request's arrival to its first token",
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "vlm_serve_time_per_output_token_seconds",
            "Time between consecutive tokens of a request",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "vlm_serve_request_latency_seconds",
            "From the request's arrival to its last token",
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
