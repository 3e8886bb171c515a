"""Prometheus metrics, served at /.bgfn/metrics behind the admin token.

Two sources, one scrape:

- the web tier's own counters (invocations by function, kind and status; synchronous durations;
  background accepts and refusals), kept by prometheus-client in multiprocess mode under
  `bgfn serve`, so every gunicorn process is counted;
- the workers' figures (jobs succeeded, failed, retried; accept-to-start and run durations),
  which workers add to one Redis hash with a single pipelined write per event, so they are right
  across any number of worker processes and hosts; the queue depth is read from Redis at scrape.

Import this module only after `PROMETHEUS_MULTIPROC_DIR` is set (bgfn.server does it for
`bgfn serve`): prometheus-client picks its storage when first imported.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterator

import redis
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from bgfn.queue import WAITING_KEY
from bgfn.stats import BUCKETS, JOB_METRICS_KEY

INVOCATIONS = Counter("bgfn_invocations_total", "HTTP invocations answered, by function, kind and status code.",
                      ["function", "kind", "status"])
SYNC_DURATION = Histogram("bgfn_sync_duration_seconds", "Time synchronous handlers took (seconds).",
                          ["function"], buckets=BUCKETS)
ACCEPTED = Counter("bgfn_background_accepted_total", "Background invocations stored and answered 202.",
                   ["function"])
REFUSED = Counter("bgfn_background_refused_total", "Background invocations refused (not stored), by reason.",
                  ["function", "reason"])


class RedisJobCollector(Collector):
    """Exports what the workers recorded in Redis, and the queue depth, at each scrape."""

    def __init__(self, connection: redis.Redis, queues: list[str]) -> None:
        self.connection = connection
        self.queues = queues

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.hgetall(JOB_METRICS_KEY)
            pipe.hgetall(WAITING_KEY)
            for queue in self.queues:
                pipe.llen(f"rq:queue:{queue}")
                pipe.zcard(f"rq:scheduled:{queue}")
            results = pipe.execute()
        raw = {k.decode(): v.decode() for k, v in results[0].items()}
        waiting = {k.decode(): max(0, int(v)) for k, v in results[1].items()}
        results = [results[0], *results[2:]]
        counters = {event: CounterMetricFamily(f"bgfn_jobs_{event}", f"Background jobs {event}, by function.",
                                               labels=["function"])
                    for event in ("succeeded", "failed", "retried", "canceled")}
        hist: dict[str, dict[str, dict[str, float]]] = {"wait": defaultdict(dict), "run": defaultdict(dict)}
        for field, value in raw.items():
            kind, _, rest = field.partition("|")
            if kind in counters:
                counters[kind].add_metric([rest], float(value))
            elif kind.endswith(("_bucket", "_sum", "_count")):
                name, _, part = kind.rpartition("_")
                if name not in hist:
                    continue
                function, _, le = rest.partition("|")
                hist[name][function][f"{part}:{le}" if part == "bucket" else part] = float(value)
        yield from counters.values()
        docs = {"wait": "Time from the 202 to the handler starting (seconds).",
                "run": "Time background handlers ran (seconds)."}
        for name, functions in hist.items():
            family = HistogramMetricFamily(f"bgfn_job_{name}_seconds", docs[name], labels=["function"])
            for function, values in functions.items():
                cumulative, buckets = 0.0, []
                for bound in [*(str(b) for b in BUCKETS), "+Inf"]:
                    cumulative += values.get(f"bucket:{bound}", 0.0)
                    buckets.append((bound, cumulative))
                family.add_metric([function], buckets, values.get("sum", 0.0))
            yield family
        depth = GaugeMetricFamily("bgfn_queue_depth", "Jobs waiting in the queue.", labels=["queue"])
        scheduled = GaugeMetricFamily("bgfn_jobs_scheduled", "Jobs waiting for a retry delay.", labels=["queue"])
        for i, queue in enumerate(self.queues):
            depth.add_metric([queue], float(results[1 + 2 * i]))
            scheduled.add_metric([queue], float(results[2 + 2 * i]))
        yield depth
        yield scheduled
        per_function = GaugeMetricFamily("bgfn_jobs_waiting", "Invocations waiting for their first run.",
                                         labels=["function"])
        for function, count in sorted(waiting.items()):
            per_function.add_metric([function], float(count))
        yield per_function
        refused = CounterMetricFamily("bgfn_jobs_refused", "Background calls refused by a queue cap (all web "
                                      "processes).", labels=["function"])
        for field, value in raw.items():
            kind, _, function = field.partition("|")
            if kind == "refused":
                refused.add_metric([function], float(value))
        yield refused


def render(connection: redis.Redis | None, queues: list[str]) -> tuple[bytes, str]:
    """The metrics page: this web tier's counters (all gunicorn processes) plus the workers' figures."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY

        registry = REGISTRY  # one process (tests, embedding): the default registry holds the counters
    if connection is not None:
        collector = RedisJobCollector(connection, queues)
        registry.register(collector)
        try:
            return generate_latest(registry), CONTENT_TYPE_LATEST
        finally:
            registry.unregister(collector)
    return generate_latest(registry), CONTENT_TYPE_LATEST

