"""Job figures the workers keep in Redis (one hash), read by the web tier's /.bgfn/metrics.

Kept apart from bgfn.metrics so workers record without importing prometheus-client.
"""

from __future__ import annotations

import logging

import redis

log = logging.getLogger("bgfn.stats")

JOB_METRICS_KEY = "bgfn:metrics"
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)
"""Histogram bucket bounds (seconds), shared by web and job histograms."""


def record(connection: redis.Redis, function: str, *, event: str | None = None,
           durations: dict[str, float] | None = None) -> None:
    """Count a job event (succeeded, failed, retried) and/or add histogram observations (`wait`, `run`),
    in one pipelined round trip. Figures are best effort: a Redis error is logged, never raised."""
    try:
        with connection.pipeline(transaction=False) as pipe:
            if event is not None:
                pipe.hincrby(JOB_METRICS_KEY, f"{event}|{function}", 1)
            for name, seconds in (durations or {}).items():
                bucket = next((str(b) for b in BUCKETS if seconds <= b), "+Inf")
                pipe.hincrby(JOB_METRICS_KEY, f"{name}_bucket|{function}|{bucket}", 1)
                pipe.hincrbyfloat(JOB_METRICS_KEY, f"{name}_sum|{function}", seconds)
                pipe.hincrby(JOB_METRICS_KEY, f"{name}_count|{function}", 1)
            pipe.execute()
    except redis.exceptions.RedisError as exc:
        log.warning("could not record job figures for %s: %s", function, exc)
