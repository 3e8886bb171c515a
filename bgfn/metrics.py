"""Prometheus metrics, served at /.bgfn/metrics behind the admin token.

Two sources, one scrape:

- the web tier's own counters (invocations by function, kind and status; synchronous durations;
  background accepts and refusals), kept by prometheus-client in multiprocess mode under
  `bgfn serve`, so every gunicorn process is counted;
- the workers' figures (jobs succeeded, failed, retried; accept-to-start and run durations),
  which workers add to one Redis hash with a single pipelined write per event, so they are right
  across any number of worker processes and hosts; the queue depth and its oldest job's wait are
  read from Redis at scrape.

Import this module only after `PROMETHEUS_MULTIPROC_DIR` is set (bgfn.server does it for
`bgfn serve`): prometheus-client picks its storage when first imported.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime
from typing import Any

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


_children: dict[tuple[str, ...], tuple[Any, ...]] = {}
"""The label children one invocation touches, by (function, kind, status[, reason]): looked up once
(prometheus-client's `labels()` takes a lock and builds a key on every call). Safe across fork:
prometheus-client re-opens a child's storage when the pid changes."""


def observe_invocation(function: str, kind: str, status: int, seconds: float, reason: str | None) -> None:
    """Count one answered invocation: by status; a synchronous one's duration; a background one as
    accepted (202) or refused for `reason`."""
    key = (function, kind, str(status)) if reason is None else (function, kind, str(status), reason)
    children = _children.get(key)
    if children is None:
        children = (INVOCATIONS.labels(function, kind, key[2]),
                    SYNC_DURATION.labels(function) if kind == "sync" else
                    ACCEPTED.labels(function) if status == 202 else REFUSED.labels(function, reason or key[2]))
        _children[key] = children
    invocations, second = children
    invocations.inc()
    if kind == "sync":
        second.observe(seconds)
    else:
        second.inc()


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
                pipe.lindex(f"rq:queue:{queue}", 0)
            results = pipe.execute()
        oldest_ids: list[bytes | None] = [results[4 + 3 * i] for i in range(len(self.queues))]
        present = [job_id for job_id in oldest_ids if job_id is not None]
        enqueued: dict[bytes, bytes | None] = {}
        if present:  # a second round trip only when a queue has a job: when it was enqueued
            with self.connection.pipeline(transaction=False) as pipe:
                for job_id in present:
                    pipe.hget(b"rq:job:" + job_id, "enqueued_at")
                enqueued = dict(zip(present, pipe.execute(), strict=True))
        raw = {k.decode(): v.decode() for k, v in results[0].items()}
        waiting = {k.decode(): max(0, int(v)) for k, v in results[1].items()}
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
        oldest = GaugeMetricFamily("bgfn_queue_oldest_age_seconds", "How long the first job in the queue has "
                                   "waited (seconds; 0 when the queue is empty).", labels=["queue"])
        now = time.time()
        for i, queue in enumerate(self.queues):
            depth.add_metric([queue], float(results[2 + 3 * i]))
            scheduled.add_metric([queue], float(results[3 + 3 * i]))
            first = oldest_ids[i]
            oldest.add_metric([queue], _age(enqueued.get(first) if first is not None else None, now))
        yield depth
        yield scheduled
        yield oldest
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


def _age(enqueued_at: bytes | None, now: float) -> float:
    """Seconds since RQ's `enqueued_at` (ISO 8601, UTC); 0 when missing or unreadable."""
    if not enqueued_at:
        return 0.0
    try:
        return max(0.0, now - datetime.fromisoformat(enqueued_at.decode().replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0.0


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

