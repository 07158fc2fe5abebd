"""Prometheus metrics of the server (`GET /metrics`, text format), in a registry of its own per app; the table of
series is docs/serving.md §6. The running and waiting gauges read the scheduler when scraped."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

disable_created_metrics()  # no `_created` series beside every counter and histogram (vLLM does the same)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                   2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class Metrics:
    """The server's counters, gauges and histograms; `render()` is the scrape body."""

    def __init__(self, running: Callable[[], float], waiting: Callable[[], float], slots: int) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("nemotron3_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.finished = Counter("nemotron3_request_finish", "choices ended, by finish reason", ["reason"], registry=r)
        self.prompt_tokens = Counter("nemotron3_prompt_tokens", "prompt tokens admitted", registry=r)
        self.generation_tokens = Counter("nemotron3_generation_tokens", "tokens generated", registry=r)
        Gauge("nemotron3_requests_running", "sequences holding a cache slot", registry=r).set_function(running)
        Gauge("nemotron3_requests_waiting", "sequences waiting for a cache slot", registry=r).set_function(waiting)
        Gauge("nemotron3_cache_slots", "cache slots (the most sequences decoding at once)", registry=r).set(slots)
        self.ttft = Histogram("nemotron3_time_to_first_token_seconds", "request arrival to a choice's first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("nemotron3_inter_token_latency_seconds", "time between a choice's consecutive tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("nemotron3_e2e_request_latency_seconds", "request arrival to its last choice's end",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.acceptance = Histogram("nemotron3_spec_decode_acceptance_length",
                                    "tokens per speculative round per row (accepted drafts + 1)",
                                    buckets=tuple(range(1, 17)), registry=r)
        self.drafted = Counter("nemotron3_spec_decode_draft_tokens", "tokens drafted by the MTP block", registry=r)
        self.accepted = Counter("nemotron3_spec_decode_accepted_tokens", "drafted tokens accepted", registry=r)

    def tokens(self, n: int, gap: float | None) -> None:
        """A choice got n tokens, `gap` seconds after its previous ones (None: its first)."""
        self.generation_tokens.inc(n)
        if gap is not None and n:
            for _ in range(n):
                self.itl.observe(gap / n)

    def round(self, accepted: int, k: int) -> None:
        self.acceptance.observe(accepted + 1)
        self.drafted.inc(k)
        self.accepted.inc(accepted)

    def render(self) -> bytes:
        return generate_latest(self.registry)
