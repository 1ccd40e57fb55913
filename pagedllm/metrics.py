"""Prometheus metrics of a serving engine (vLLM's names, prefix `pagedllm:`) and the
periodic stats log line.

`EngineMetrics.observe` is the async engine's step observer: it runs on the event
loop for every report of an engine core (one per loop turn of each data-parallel
replica), sees that replica's scheduler stats and the turn's output deltas, and
updates everything from them. The engine-wide gauges and counters add the replicas
up; the `dp_replica_*` series (label `replica`) show each replica's load and prefix
cache hits, which is where prefix-aware routing shows. Each engine has its own
registry, so several servers can live in one process (tests).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pagedllm.core.scheduler import SchedulerStats, combined_stats
from pagedllm.outputs import RequestOutput

logger = logging.getLogger(__name__)

# vLLM's buckets.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


@dataclass
class _Totals:
    """Running totals: counters are incremented by their changes, the log line
    turns them into rates."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    preemptions: int = 0


class EngineMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]

        def metric(kind, name: str, doc: str, extra_labels=(), **kwargs):
            made = kind(f"pagedllm:{name}", doc, labels + list(extra_labels), registry=self.registry, **kwargs)
            return made if extra_labels else made.labels(model_name)

        self.model_name = model_name
        self.running = metric(Gauge, "num_requests_running", "Requests in the running batch.")
        self.waiting = metric(Gauge, "num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = metric(Gauge, "kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = full).")
        self.prompt_tokens = metric(Counter, "prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = metric(Counter, "generation_tokens", "Tokens generated.")
        self.request_success = metric(Counter, "request_success", "Finished completions (one per sample), "
                                      "by finish reason.", extra_labels=["finished_reason"])
        self.preemptions = metric(Counter, "num_preemptions", "Requests preempted (blocks freed, recomputed).")
        self.prefix_queries = metric(Counter, "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = metric(Counter, "prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.ttft = metric(Histogram, "time_to_first_token_seconds", "Arrival to first token.",
                           buckets=TTFT_BUCKETS)
        self.itl = metric(Histogram, "inter_token_latency_seconds", "Time between consecutive steps' tokens.",
                          buckets=ITL_BUCKETS)
        self.e2e = metric(Histogram, "e2e_request_latency_seconds", "Arrival to finish.",
                          buckets=REQUEST_LATENCY_BUCKETS)
        self.queue_time = metric(Histogram, "request_queue_time_seconds", "Arrival to the start of the step that "
                                 "produced the first output (its first scheduling, unless its prompt was chunked).",
                                 buckets=REQUEST_LATENCY_BUCKETS)
        self.replica_running = metric(Gauge, "dp_replica_num_requests_running", "Requests in a replica's running "
                                      "batch.", extra_labels=["replica"])
        self.replica_waiting = metric(Gauge, "dp_replica_num_requests_waiting", "Requests waiting in a replica.",
                                      extra_labels=["replica"])
        self.replica_prefix_queries = metric(Counter, "dp_replica_prefix_cache_queries", "Prompt tokens a replica "
                                             "looked up in its prefix cache.", extra_labels=["replica"])
        self.replica_prefix_hits = metric(Counter, "dp_replica_prefix_cache_hits", "Prompt tokens a replica found "
                                          "in its prefix cache.", extra_labels=["replica"])
        self._totals = _Totals()
        self._logged = _Totals()
        self._logged_at = time.monotonic()
        # Each replica's latest stats, and the totals its counters were last advanced to.
        self._replica_stats: dict[int, SchedulerStats] = {}
        self._replica_totals: dict[int, _Totals] = {}
        self._stats: SchedulerStats | None = None
        # Request id -> time of its latest tokens, for inter-token latency.
        self._last_token_times: dict[str, float] = {}

    # ---- event loop: a report of an engine core -----------------------------------------

    def observe(self, replica: int, stats: SchedulerStats, outputs: list[RequestOutput],
                turn_started: float) -> None:
        self._observe_scheduler(replica, stats)
        for output in outputs:
            self._observe_output(output, turn_started)

    def _observe_scheduler(self, replica: int, stats: SchedulerStats) -> None:
        self._replica_stats[replica] = stats
        engine = combined_stats(list(self._replica_stats.values()))
        self.running.set(engine.num_running)
        self.waiting.set(engine.num_waiting)
        self.kv_usage.set(engine.kv_cache_usage)
        label = str(replica)
        self.replica_running.labels(self.model_name, label).set(stats.num_running)
        self.replica_waiting.labels(self.model_name, label).set(stats.num_waiting)
        # The scheduler keeps totals; counters take the increments.
        last = self._replica_totals.setdefault(replica, _Totals())
        increments = _Totals(preemptions=stats.num_preemptions_total - last.preemptions,
                             prefix_queries=stats.prefix_cache_queried_tokens - last.prefix_queries,
                             prefix_hits=stats.prefix_cache_hit_tokens - last.prefix_hits)
        last.preemptions = stats.num_preemptions_total
        last.prefix_queries = stats.prefix_cache_queried_tokens
        last.prefix_hits = stats.prefix_cache_hit_tokens
        self.preemptions.inc(increments.preemptions)
        self.prefix_queries.inc(increments.prefix_queries)
        self.prefix_hits.inc(increments.prefix_hits)
        self.replica_prefix_queries.labels(self.model_name, label).inc(increments.prefix_queries)
        self.replica_prefix_hits.labels(self.model_name, label).inc(increments.prefix_hits)
        totals = self._totals
        totals.preemptions += increments.preemptions
        totals.prefix_queries += increments.prefix_queries
        totals.prefix_hits += increments.prefix_hits
        self._stats = engine

    def _observe_output(self, output: RequestOutput, turn_started: float) -> None:
        times = output.metrics
        num_new_tokens = sum(len(sample.token_ids) for sample in output.outputs)
        if num_new_tokens:
            self.generation_tokens.inc(num_new_tokens)
            self._totals.generation_tokens += num_new_tokens
            previous = self._last_token_times.get(output.request_id)
            if previous is None:
                self._observe_first_tokens(output, turn_started)
            else:
                self.itl.observe(times.last_token_time - previous)
            self._last_token_times[output.request_id] = times.last_token_time
        for sample in output.outputs:
            if sample.finish_reason is not None:
                self.request_success.labels(self.model_name, sample.finish_reason).inc()
        if output.finished:
            self._last_token_times.pop(output.request_id, None)
            self.e2e.observe((times.finished_time or time.monotonic()) - times.arrival_time)

    def _observe_first_tokens(self, output: RequestOutput, turn_started: float) -> None:
        times = output.metrics
        self.prompt_tokens.inc(len(output.prompt_token_ids))
        self._totals.prompt_tokens += len(output.prompt_token_ids)
        self.ttft.observe(times.first_token_time - times.arrival_time)
        self.queue_time.observe(max(0.0, turn_started - times.arrival_time))

    # ---- event loop --------------------------------------------------------------------

    def log_stats(self) -> None:
        """Log throughput and load since the last call, unless the engine was idle."""
        now, stats, previous = time.monotonic(), self._stats, self._logged
        current = dataclasses.replace(self._totals)
        elapsed = max(now - self._logged_at, 1e-9)
        self._logged, self._logged_at = current, now
        num_prompt = current.prompt_tokens - previous.prompt_tokens
        num_generated = current.generation_tokens - previous.generation_tokens
        if stats is None or not (num_prompt or num_generated or stats.num_running or stats.num_waiting):
            return
        num_queries = current.prefix_queries - previous.prefix_queries
        hit_rate = (current.prefix_hits - previous.prefix_hits) / num_queries if num_queries else 0.0
        logger.info("Running: %d reqs, Waiting: %d reqs, KV cache usage: %.1f%%, Prompt throughput: %.1f tokens/s, "
                    "Generation throughput: %.1f tokens/s, Prefix cache hit rate: %.1f%%",
                    stats.num_running, stats.num_waiting, stats.kv_cache_usage * 100, num_prompt / elapsed,
                    num_generated / elapsed, hit_rate * 100)
