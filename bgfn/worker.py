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
from rq import Queue, Worker
from rq.job import Job, get_current_job
from rq.serializers import JSONSerializer
from rq.worker_pool import WorkerPool

from bgfn.config import load_site
from bgfn.discovery import Registry, load_registry
from bgfn.errors import FunctionNotFound
from bgfn.event import LambdaContext
from bgfn.invoke import call_handler
from bgfn.queue import JOB_FUNCTION, make_queue
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
    job = get_current_job()
    registry = _current_registry()
    if function_name not in registry:
        # Nothing ran, so there is nothing to retry: fail the job now with a message that says why.
        if job is not None:
            job.retries_left = 0
        log.error("background %s job %s: this worker has no function %r; the job fails without retries",
                  function_name, job.id if job else "unknown", function_name)
        raise FunctionNotFound(f"background function {function_name!r} is not among this worker's functions "
                               f"({', '.join(f.name for f in registry) or 'none'}): run the workers on the same "
                               "functions as the web server")
    function = registry.get(function_name)
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


def _time_limit(job: Job) -> int | None:
    """This worker's time limit for `job`: its function's timeout here (BGFN_BACKGROUND_TIMEOUT and the
    function's own `timeout`), or None for a job that is not a known bgfn function."""
    if job.func_name != JOB_FUNCTION:
        return None
    try:
        name = job.args[0]
    except Exception:  # noqa: BLE001 - undecodable arguments fail in run_job, with RQ's own message
        return None
    if not isinstance(name, str) or name not in _current_registry():
        return None
    return max(1, int(round(_current_registry().get(name).timeout)))


class BgfnWorker(Worker):
    """An RQ worker that enforces its own time limit: the shorter of the job's and its function's here.

    The web tier sets a job's timeout from its own settings; the worker that runs the job is the one
    whose BGFN_BACKGROUND_TIMEOUT and function `timeout` must hold (the limit is set before the work
    horse forks, so both RQ's alarm in the horse and the parent's kill of a stuck horse use it).
    """

    def execute_job(self, job: Job, queue: Queue) -> None:
        limit = _time_limit(job)
        if limit is not None and (job.timeout is None or job.timeout <= 0 or job.timeout > limit):
            job.timeout = limit
        super().execute_job(job, queue)


def run_workers(settings: Settings, registry: Registry, connection: redis.Redis, *,
                burst: bool = False) -> None:
    """Run `settings.worker_processes` RQ workers on the queue until stopped (SIGTERM/SIGINT)."""
    set_registry(registry)
    level = settings.log_level
    if settings.worker_processes == 1:
        worker = BgfnWorker([make_queue(connection, settings.queue)], connection=connection,
                            serializer=JSONSerializer)
        worker.work(burst=burst, with_scheduler=True, logging_level=level)
        return
    pool = WorkerPool([settings.queue], connection=connection, num_workers=settings.worker_processes,
                      serializer=JSONSerializer, worker_class=BgfnWorker)
    pool.start(burst=burst, logging_level=level)
