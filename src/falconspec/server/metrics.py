"""Prometheus metrics of the server, in the vocabulary of ``verify.py`` (drafted, accepted, accepted length).

Token and request counters cover every request; the speculative counters (cycles, drafted, accepted, times)
come from the ``SpecStats`` of requests that ran to the end (a cancelled request has no final statistics).
The batch metrics (``batch_size``: sequences per cycle, ``batch_step_seconds``, ``max_batch``), the queue time
(admission to joining the batch) and the time to first token show what continuous batching does.
Each server owns its registry, so several apps can live in one process (tests).
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from ..generate import StreamChunk
from ..metrics import SpecStats

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
ACCEPTED_LENGTH_BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 24, 32)
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 24, 32, 48, 64)
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServerMetrics:
    """Counters and histograms of one served model; ``render()`` gives the Prometheus text format."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model: str, drafter: str, max_batch: int = 1):
        self.registry = registry = CollectorRegistry()
        ns = "falconspec"
        Info("model", "the served model and drafter", namespace=ns, registry=registry).info(
            {"model": model, "drafter": drafter})
        self.requests = Counter("requests", "HTTP requests by endpoint and status code", ["endpoint", "status"],
                                namespace=ns, registry=registry)
        self.finished = Counter("requests_finished",
                                "generations by outcome: stop, length, cancelled, timeout, shutdown, error",
                                ["outcome"], namespace=ns, registry=registry)
        self.prompt_tokens = Counter("prompt_tokens", "prompt tokens of completed generations", namespace=ns,
                                     registry=registry)
        self.generation_tokens = Counter("generation_tokens", "tokens generated and sent (cancelled requests too)",
                                         namespace=ns, registry=registry)
        self.target_forwards = Counter("target_forwards", "target forward passes, prefills included",
                                       namespace=ns, registry=registry)
        self.cycles = Counter("spec_decode_cycles", "draft+verify cycles (verification forwards)", namespace=ns,
                              registry=registry)
        self.drafted = Counter("spec_decode_drafted_tokens", "drafted tokens (tree nodes below the root)",
                               namespace=ns, registry=registry)
        self.accepted = Counter("spec_decode_accepted_tokens", "drafted tokens the target accepted", namespace=ns,
                                registry=registry)
        self.accepted_length = Histogram(
            "spec_decode_accepted_length", "tokens committed per verification forward (accepted drafts + bonus)",
            namespace=ns, registry=registry, buckets=ACCEPTED_LENGTH_BUCKETS)
        self.seconds = Counter("generation_seconds", "time spent per phase of the decode loop", ["phase"],
                               namespace=ns, registry=registry)
        self.queue_time = Histogram("queue_time_seconds", "time from admission to joining the batch",
                                    namespace=ns, registry=registry, buckets=LATENCY_BUCKETS)
        self.first_token = Histogram("time_to_first_token_seconds", "time from admission to the first streamed chunk",
                                     namespace=ns, registry=registry, buckets=LATENCY_BUCKETS)
        self.duration = Histogram("request_duration_seconds", "time from admission to the end of generation",
                                  namespace=ns, registry=registry, buckets=LATENCY_BUCKETS)
        self.plan_nodes = Gauge("planned_tree_nodes", "tree size (root included) the planner chose last; 1 = plain",
                                namespace=ns, registry=registry)
        self.plan_depth = Gauge("planned_draft_depth", "drafting depth the planner chose last", namespace=ns,
                                registry=registry)
        self.fallbacks = Counter("planner_fallbacks", "generations the planner decoded plainly (no tree expected to "
                                 "beat plain decoding)", namespace=ns, registry=registry)
        self.running = Gauge("requests_running", "generations in the batch (at most max_batch)", namespace=ns,
                             registry=registry)
        self.waiting = Gauge("requests_waiting", "admitted requests waiting for a place in the batch", namespace=ns,
                             registry=registry)
        Gauge("max_batch", "most sequences generated at once (--max-batch)", namespace=ns,
              registry=registry).set(max_batch)
        self.batch_size = Histogram("batch_size", "sequences per batch cycle (one step of every running generation)",
                                    namespace=ns, registry=registry, buckets=BATCH_SIZE_BUCKETS)
        self.step_seconds = Histogram("batch_step_seconds", "duration of one batch cycle", namespace=ns,
                                      registry=registry, buckets=STEP_BUCKETS)

    def track_queue(self, running: Callable[[], float], waiting: Callable[[], float]) -> None:
        self.running.set_function(running)
        self.waiting.set_function(waiting)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def request_done(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    # ---------------------------------------------------------------- JobObserver (called from the worker)
    def job_started(self, queue_seconds: float) -> None:
        self.queue_time.observe(queue_seconds)

    def batch_step(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.step_seconds.observe(seconds)

    def job_chunk(self, chunk: StreamChunk, since_submit: float, first: bool) -> None:
        self.generation_tokens.inc(len(chunk.token_ids))
        if first:
            self.first_token.observe(since_submit)

    def job_finished(self, outcome: str, stats: SpecStats | None, since_submit: float) -> None:
        self.finished.labels(outcome).inc()
        self.duration.observe(since_submit)
        if stats is None:
            return
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.target_forwards.inc(stats.target_forwards)
        self.cycles.inc(stats.cycles)
        self.drafted.inc(stats.drafted_tokens)
        self.accepted.inc(stats.accepted_tokens)
        for accepted in stats.accepted_per_cycle:
            self.accepted_length.observe(accepted + 1)
        for phase in ("prefill", "draft", "verify"):
            self.seconds.labels(phase).inc(getattr(stats, f"{phase}_time"))
        if stats.plans:
            self.plan_nodes.set(stats.plans[-1]["num_nodes"])
            self.plan_depth.set(stats.plans[-1]["depth"])
            if stats.fell_back:
                self.fallbacks.inc()
