"""Prometheus metrics of one server (its own registry: two apps in one process never share)."""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
TOKS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("vila_edge_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("vila_edge_prompt_tokens", "prompt tokens (image tokens included)", registry=r)
        self.cached_tokens = Counter("vila_edge_cached_prompt_tokens", "prompt tokens whose KV was reused", registry=r)
        self.completion_tokens = Counter("vila_edge_completion_tokens", "generated tokens", registry=r)
        self.ttft = Histogram("vila_edge_time_to_first_token_seconds", "request start to first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.decode = Histogram("vila_edge_decode_tokens_per_second", "decode speed per request",
                                buckets=TOKS_BUCKETS, registry=r)
        self.kv_blocks = Gauge("vila_edge_kv_blocks", "KV pool blocks by state", ["state"], registry=r)
        self.queue = Gauge("vila_edge_queue_length", "requests waiting for a worker", registry=r)
        self.running = Gauge("vila_edge_running_requests", "requests on a worker", registry=r)
        self.interrupted = Gauge("vila_edge_interrupted_requests", "requests stopped early: client gone or shutdown",
                                 registry=r)

    def record(self, stats: dict) -> None:
        self.prompt_tokens.inc(stats.get("prompt_tokens", 0))
        self.cached_tokens.inc(stats.get("cached_tokens", 0))
        self.completion_tokens.inc(stats.get("new_tokens", 0))
        if "ttft_s" in stats:
            self.ttft.observe(stats["ttft_s"])
        if stats.get("decode_tok_s"):
            self.decode.observe(stats["decode_tok_s"])

    def render(self, kv, sched: dict) -> bytes:
        """Text exposition, with the pool and queue gauges read now."""
        self.kv_blocks.labels("used").set(kv.used)
        self.kv_blocks.labels("cached").set(kv.cached)
        self.kv_blocks.labels("free").set(kv.free)
        self.queue.set(sched["queued"])
        self.running.set(sched["running"])
        self.interrupted.set(sched["interrupted"])
        return generate_latest(self.registry)
