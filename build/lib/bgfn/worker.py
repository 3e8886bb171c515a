"""The worker: runs background invocations stored by the web tier.

`bgfn worker` loads the site's functions once, then runs RQ workers (each forks a work horse per
job, so a crashing or stuck handler never takes the worker down; RQ's parent kills a horse that
overruns its timeout even when the handler is stuck in C code). Delayed retries are moved back
onto the queue by RQ's scheduler, which every worker runs.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import redis
from rq import Worker
from rq.job import get_current_job
from rq.serializers import JSONSerializer
from rq.worker_pool import WorkerPool

from bgfn.config import load_site
from bgfn.discovery import Registry, load_registry
from bgfn.event import LambdaContext
from bgfn.invoke import call_handler
from bgfn.queue import make_queue
from bgfn.settings import Settings

log = logging.getLogger("bgfn.worker")

_registry: Registry | None = None


def set_registry(registry: Registry) -> None:
    """Make `registry` the functions this process runs (called before the workers start)."""
    global _registry
    _registry = registry


def _current_registry() -> Registry:
    global _registry
    if _registry is None:  # a plain `rq worker` running bgfn's jobs: load from the environment
        settings = Settings.load()
        _registry, _ = load_registry(load_site(settings.site), settings)
    return _registry


def _json_safe(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


def run_job(function_name: str, event: dict[str, Any], meta: dict[str, Any]) -> Any:
    """The RQ job function: run one background invocation in this work horse."""
    function = _current_registry().get(function_name)
    job = get_current_job()
    request_id = str(meta.get("request_id") or (job.id if job else "unknown"))
    attempt = 1
    if job is not None and job.retry_intervals is not None and job.retries_left is not None:
        attempt = len(job.retry_intervals) - job.retries_left + 1
    waited = time.time() - float(meta.get("accepted_at", time.time()))
    log.info("background %s job %s: attempt %d started (%.3f s after accept)",
             function_name, request_id, attempt, waited)
    context = LambdaContext(function_name, request_id, function.timeout)
    started = time.monotonic()
    try:
        result = call_handler(function, event, context)
    except BaseException as exc:
        log.warning("background %s job %s: attempt %d raised %s: %s after %.3f s", function_name,
                    request_id, attempt, type(exc).__name__, exc, time.monotonic() - started)
        raise
    log.info("background %s job %s: attempt %d succeeded in %.3f s", function_name, request_id, attempt,
             time.monotonic() - started)
    return _json_safe(result)


def run_workers(settings: Settings, registry: Registry, connection: redis.Redis, *,
                burst: bool = False) -> None:
    """Run `settings.worker_processes` RQ workers on the queue until stopped (SIGTERM/SIGINT)."""
    set_registry(registry)
    level = settings.log_level
    if settings.worker_processes == 1:
        worker = Worker([make_queue(connection, settings.queue)], connection=connection,
                        serializer=JSONSerializer)
        worker.work(burst=burst, with_scheduler=True, logging_level=level)
        return
    pool = WorkerPool([settings.queue], connection=connection, num_workers=settings.worker_processes,
                      serializer=JSONSerializer)
    pool.start(burst=burst, logging_level=level)
