"""Prometheus metrics of one server (its own registry, so several servers can live in one process)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_TOKEN_BUCKETS = (256, 1024, 4096, 8192, 16384, 32768, 65536, 131072, 262144)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("polar_serve_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.items = Counter("polar_serve_items", "items (rollouts) scored", registry=r)
        self.tokens = Counter("polar_serve_tokens", "tokens of the scored items, each counted alone", registry=r)
        self.computed_tokens = Counter("polar_serve_computed_tokens",
                                       "tokens run through the model (shared prefixes counted once)", registry=r)
        self.prefix_saved = Counter("polar_serve_prefix_tokens_saved",
                                    "tokens not computed thanks to shared prefixes", registry=r)
        # a reward read from an output cut to its head never saw its end: how often, per field
        self.cut = Counter("polar_serve_truncated", "structured items' fields cut by POLAR's truncation "
                           "(--max-response for outputs and references, --max-length for prompts)",
                           ["field"], registry=r)
        for field in ("output", "reference", "prompt"):  # exported at 0 before the first cut
            self.cut.labels(field=field)
        self.batch_items = Histogram("polar_serve_batch_items", "items per forward pass",
                                     buckets=_SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram("polar_serve_batch_tokens", "padded tokens per forward pass",
                                      buckets=_TOKEN_BUCKETS, registry=r)
        self.batch_requests = Histogram("polar_serve_batch_requests", "requests served by one batching round",
                                        buckets=_SIZE_BUCKETS, registry=r)
        self.queue_items = Gauge("polar_serve_queue_items", "items waiting to be scored", registry=r)
        self.reading_bytes = Gauge("polar_serve_reading_bytes", "body bytes held for the requests being read, "
                                   "parsed and tokenized, of --max-reading-bytes", registry=r)
        # where clients give up tells whether it costs: only those gone while scoring cost model time
        self.gone = Counter("polar_serve_client_gone", "requests whose client closed the connection before its "
                            "answer, by what the request was doing: waiting (for room to be read in), reading "
                            "(its body), preparing (parsed or tokenized: never queued), queued (left the queue "
                            "unscored), scoring (its batch had started: scored for nobody)", ["stage"], registry=r)
        for stage in ("waiting", "reading", "preparing", "queued", "scoring"):  # exported at 0 before the first
            self.gone.labels(stage=stage)
        self.rejected = Counter("polar_serve_rejected", "requests refused with 429 (queue full)", registry=r)
        self.latency = Histogram("polar_serve_request_seconds", "request latency by endpoint", ["endpoint"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("polar_serve_queue_wait_seconds", "time a request waits for its batch",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.forward = Histogram("polar_serve_forward_seconds", "model time per forward pass",
                                 buckets=_LATENCY_BUCKETS, registry=r)
