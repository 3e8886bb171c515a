"""The worker: runs background invocations stored by the web tier.

`bgfn worker` loads the site's functions once, then runs RQ workers. Each runs its jobs in a work
horse, a child process (bgfn.horse), so a crashing or stuck handler never takes the worker down,
and the worker kills a horse that overruns its job's time limit even when the handler is stuck in
C code. Delayed retries are moved back onto the queue by RQ's scheduler, which every worker runs.

What bgfn adds to RQ's worker (:class:`BgfnWorker`):

- one long-lived work horse runs job after job (RQ forks one per job, which costs as much as a
  trivial job); a fresh one is forked after a kill, a crash or BGFN_HORSE_MAX_JOBS jobs;
- the time limit is the worker's own (BGFN_BACKGROUND_TIMEOUT and the function's `timeout`);
- lost jobs: workers heartbeat running jobs every sixth of BGFN_LOST_JOB_TIMEOUT and look for
  jobs whose heartbeat stopped every third of it, so a job whose worker was killed is retried
  (as a failed attempt) within about twice BGFN_LOST_JOB_TIMEOUT plus its retry delay; a job
  taken off the queue but never started (Redis went away mid-dequeue) is put back after
  BGFN_LOST_JOB_TIMEOUT, not counted as an attempt;
- shutdown: on SIGTERM a worker takes no new job and lets the running one finish for up to
  BGFN_SHUTDOWN_GRACE seconds, then stops it and hands it back to the front of the queue (not
  counted as an attempt);
- Redis outages: `bgfn worker` (one process) outlives a Redis restart: when RQ's work loop quits on a
  Redis error, a new worker starts once Redis answers again; the job it was running is a lost job.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import sys
import time
from collections import deque
from typing import Any

import redis
from rq import Queue, Worker, worker_registration
from rq.exceptions import InvalidJobOperation, StopRequested
from rq.job import Job, JobStatus, get_current_job
from rq.registry import StartedJobRegistry, clean_registries
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException
from rq.utils import now
from rq.worker_pool import WorkerPool

from bgfn import defaults, horse, stats
from bgfn.config import load_site
from bgfn.discovery import Registry, load_registry
from bgfn.errors import FunctionNotFound
from bgfn.event import LambdaContext
from bgfn.invoke import call_handler, timeout_message
from bgfn.queue import JOB_FUNCTION, STARTED_KEY, WAITING_KEY, BgfnQueue, enqueue_callback, make_queue
from bgfn.settings import Settings

log = logging.getLogger("bgfn.worker")

_registry: Registry | None = None
_settings: Settings | None = None


class EventExpired(Exception):
    """The job waited longer than its function's max_event_age: it fails without running."""


def set_registry(registry: Registry, settings: Settings | None = None) -> None:
    """Make `registry` the functions this process runs (called before the workers start)."""
    global _registry, _settings
    _registry = registry
    if settings is not None:
        _settings = settings


def current_settings() -> Settings:
    global _settings
    if _settings is None:
        _settings = Settings.load()
    return _settings


def _current_registry() -> Registry:
    global _registry
    if _registry is None:  # a plain `rq worker` running bgfn's jobs: load from the environment
        settings = current_settings()
        _registry, _ = load_registry(load_site(settings.site), settings)
    return _registry


def _json_safe(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


class _LogTail:
    """What a run printed or logged: everything goes on to the console, the last `limit` characters
    are kept for the job record."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.chunks: deque[str] = deque()
        self.size = 0
        self.dropped = 0

    def add(self, text: str) -> None:
        self.chunks.append(text)
        self.size += len(text)
        while self.size > self.limit and self.chunks:
            extra = self.size - self.limit
            head = self.chunks[0]
            if len(head) <= extra:
                self.chunks.popleft()
                self.size -= len(head)
                self.dropped += len(head)
            else:
                self.chunks[0] = head[extra:]
                self.size -= extra
                self.dropped += extra

    def text(self) -> str:
        return "".join(self.chunks)


class _Tee(io.TextIOBase):
    def __init__(self, stream: Any, tail: _LogTail) -> None:
        self.stream = stream
        self.tail = tail

    def write(self, text: str) -> int:
        self.tail.add(text)
        try:
            self.stream.write(text)
        except (OSError, ValueError):
            pass
        return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except (OSError, ValueError):
            pass


class _FunctionLogHandler(logging.Handler):
    """Sends the function's own log records (not bgfn's or RQ's) to the captured stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(("rq.", "bgfn.")) or record.name in ("rq", "bgfn"):
            return
        sys.stderr.write(f"{record.levelname} {record.name}: {record.getMessage()}\n")


def _save(job: Job | None) -> None:
    if job is None:
        return
    try:
        job.save_meta()
    except redis.exceptions.RedisError as exc:  # the outcome still reaches RQ; only the extras are lost
        log.warning("job %s: could not save its record's details: %s", job.id, exc)


def _fields(event: str, function: str, job_id: str, attempt: int, started: float | None = None,
            error: str | None = None) -> dict[str, Any]:
    """The structured fields of a job's log line (JSON logs); the job id is the 202's request id."""
    fields: dict[str, Any] = {"event": event, "function": function, "job_id": job_id, "request_id": job_id,
                              "attempt": attempt, "kind": "background"}
    if started is not None:
        fields["duration_ms"] = round((time.monotonic() - started) * 1000, 3)
    if error is not None:
        fields["error"] = error
    return fields


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
    record: dict[str, Any] = job.meta if job is not None else {}
    waited = time.time() - float(meta.get("accepted_at", time.time()))

    max_age = function.retry.max_event_age
    if max_age is not None and waited > max_age:
        if job is not None:
            job.retries_left = 0
        message = (f"the event is {waited:.0f} s old, over max_event_age = {max_age:g} s for {function_name}; "
                   "it was dropped without running")
        record["error"] = {"type": "EventExpired", "message": message}
        _save(job)
        log.warning("background %s job %s: %s", function_name, request_id, message)
        raise EventExpired(message)

    attempt = int(record.get("attempts", 0)) + 1
    record["attempts"] = attempt
    record.pop("error", None)
    _save(job)
    if attempt == 1 and job is not None:
        stats.record(job.connection, function_name, durations={"wait": max(0.0, waited)})
    log.info("background %s job %s: attempt %d of %d started (%.3f s after accept)",
             function_name, request_id, attempt, function.retry.max_attempts, waited,
             extra=_fields("job_started", function_name, request_id, attempt))

    tail = _LogTail(defaults.JOB_LOG_LIMIT)
    previous = (sys.stdout, sys.stderr)
    handler = _FunctionLogHandler()
    sys.stdout, sys.stderr = _Tee(sys.stdout, tail), _Tee(sys.stderr, tail)
    logging.getLogger().addHandler(handler)
    context = LambdaContext(function_name, request_id, function.timeout)
    started = time.monotonic()
    try:
        result = call_handler(function, event, context)
    except BaseException as exc:
        if isinstance(exc, JobTimeoutException):
            timeout = job.timeout if job is not None and job.timeout else function.timeout
            record["error"] = {"type": "TimeoutError", "message": timeout_message(float(timeout))}
        else:
            record["error"] = {"type": type(exc).__name__, "message": str(exc)}
        log.warning("background %s job %s: attempt %d raised %s: %s after %.3f s", function_name,
                    request_id, attempt, type(exc).__name__, exc, time.monotonic() - started,
                    extra=_fields("job_failed", function_name, request_id, attempt, started,
                                  error=f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        logging.getLogger().removeHandler(handler)
        sys.stdout, sys.stderr = previous
        record["logs"] = tail.text()
        record["logs_truncated"] = tail.dropped > 0
        _save(job)
        if job is not None:
            stats.record(job.connection, function_name, durations={"run": time.monotonic() - started})
    log.info("background %s job %s: attempt %d succeeded in %.3f s", function_name, request_id, attempt,
             time.monotonic() - started, extra=_fields("job_succeeded", function_name, request_id, attempt, started))
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


def _how_it_ended(wait_status: int | None) -> str:
    if wait_status is None:
        return "no exit status"
    if os.WIFSIGNALED(wait_status):
        number = os.WTERMSIG(wait_status)
        return f"signal {number} ({signal.Signals(number).name})" if number in signal.valid_signals() \
            else f"signal {number}"
    return f"exit status {os.WEXITSTATUS(wait_status)}"


class BgfnWorker(Worker):
    """RQ's worker with a long-lived work horse, bgfn's time limit, lost-job detection and graceful
    hand-back."""

    death_penalty_class = horse.RepeatingAlarm

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        lost = current_settings().lost_job_timeout
        self.heartbeat_interval = max(1, lost // 6)
        kwargs.setdefault("job_monitoring_interval", self.heartbeat_interval)
        kwargs.setdefault("maintenance_interval", max(1, lost // 3))
        # RQ blocks on an empty queue for worker_ttl - 15 s; keep that within the maintenance interval.
        kwargs.setdefault("worker_ttl", max(1, lost // 3) + 15)
        super().__init__(*args, **kwargs)
        self._stop_deadline: float | None = None
        self._handing_back: str | None = None
        self._horse: horse.Horse | None = None

    def fork_work_horse(self, job: Job, queue: Queue) -> None:
        """Hand `job` to the work horse, forking one first when there is none (or it is spent)."""
        current = self._horse
        if current is not None and current.jobs >= current_settings().horse_max_jobs:
            self._retire_horse()
            current = None
        execution = self.execution
        assert execution is not None  # prepare_execution() made it
        if current is None or not current.send(job.id, queue.name, execution.id, job.timeout):
            if current is not None:  # it died between jobs
                self._retire_horse()
            current = self._horse = horse.spawn(self)
            current.send(job.id, queue.name, execution.id, job.timeout)  # a horse dead already shows as ended
        current.jobs += 1
        self._horse_pid = current.pid
        self.procline(f"Job {job.id} in work horse {current.pid} since {time.time()}")

    def monitor_work_horse(self, job: Job, queue: Queue, execution: Any) -> None:
        """Wait for the horse to finish the job, heartbeating it; kill the horse when the job runs
        HORSE_KILL_GRACE seconds past its time limit; fail the job when the horse died under it."""
        current = self._horse
        assert current is not None
        job.started_at = now()
        limit = job.timeout if job.timeout is not None and job.timeout > 0 else None
        deadline = None if limit is None else time.monotonic() + limit + defaults.HORSE_KILL_GRACE
        finished, overran, exit_status = False, False, None
        while True:
            wait = float(self.job_monitoring_interval)
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
            outcome = current.wait(wait)
            if outcome is not None:
                finished = outcome
                if not finished:
                    _, exit_status, _ = self.wait_for_horse()
                break
            if deadline is not None and time.monotonic() >= deadline:
                self.heartbeat(self.job_monitoring_interval + 60)
                self.kill_horse()
                self.wait_for_horse()
                overran = True
                break
            self.maintain_heartbeats(job, execution)
        self._horse_pid = 0
        self.executions.pop(execution.id, None)
        if finished:
            return
        current.close()
        self._horse = None
        try:
            status = job.get_status()
        except InvalidJobOperation:
            return  # the job is gone (finished and expired)
        if self._stopped_job_id == job.id:
            self._handle_stopped_job(job, queue, execution)
        elif status not in (JobStatus.FINISHED, JobStatus.FAILED):
            job.ended_at = now()
            if overran:
                exc_string = (f"JobTimeoutException: the handler was still running {defaults.HORSE_KILL_GRACE} s "
                              f"after its {limit} s time limit (stuck where the alarm cannot reach it, such as a "
                              "C call): the worker killed its work horse")
                self._record_error(job, "TimeoutError", timeout_message(float(limit or 0)))
            else:
                cause = _how_it_ended(exit_status)
                exc_string = f"Work horse ended unexpectedly ({cause}) while running the job"
                self._record_error(job, "WorkerCrash", f"the process running the handler ended ({cause})")
            self.log.warning("Worker %s: job %s failed: %s", self.name, job.id, exc_string)
            self.handle_work_horse_killed(job, current.pid, exit_status or 0, None)
            self.handle_job_failure(job, queue=queue, exc_string=exc_string, execution=execution)

    def _record_error(self, job: Job, kind: str, message: str) -> None:
        """Put the error of a run that the horse could not record itself on the job's record."""
        if job.func_name != JOB_FUNCTION or self._handing_back == job.id:
            return
        try:
            meta = job.get_meta(refresh=True)  # the horse's latest record (not a whole refresh: ended_at is set)
            meta["error"] = {"type": kind, "message": message}
            job.meta = meta
            job.save_meta()
        except (redis.exceptions.RedisError, InvalidJobOperation) as exc:
            self.log.warning("Worker %s: could not record the error of job %s: %s", self.name, job.id, exc)

    def _retire_horse(self) -> None:
        if self._horse is not None:
            horse.retire(self._horse)
            self._horse = None

    def teardown(self) -> None:
        self._retire_horse()
        super().teardown()

    def execute_job(self, job: Job, queue: Queue) -> None:
        limit = _time_limit(job)
        if limit is not None and (job.timeout is None or job.timeout <= 0 or job.timeout > limit):
            job.timeout = limit
        self._count_start(job)
        super().execute_job(job, queue)

    def _count_start(self, job: Job) -> None:
        """Feed backpressure (bgfn.limits): one more job started; one fewer waiting for its first run."""
        try:
            with self.connection.pipeline(transaction=False) as pipe:
                pipe.incr(STARTED_KEY)
                meta = job.meta or {}
                if job.func_name == JOB_FUNCTION and not int(meta.get("attempts", 0)) and meta.get("function"):
                    pipe.hincrby(WAITING_KEY, str(meta["function"]), -1)
                pipe.execute()
        except redis.exceptions.RedisError as exc:
            self.log.warning("Worker %s: could not count the start of job %s: %s", self.name, job.id, exc)

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        """A running job's heartbeat lasts BGFN_LOST_JOB_TIMEOUT (RQ's own grace is 60 s)."""
        return current_settings().lost_job_timeout

    def handle_warm_shutdown_request(self) -> None:
        super().handle_warm_shutdown_request()
        self._stop_deadline = time.monotonic() + current_settings().shutdown_grace

    def maintain_heartbeats(self, job: Job, execution: Any) -> None:
        super().maintain_heartbeats(job, execution)
        if self._stop_deadline is not None and time.monotonic() >= self._stop_deadline and self.horse_pid:
            self.log.warning("Worker %s: job %s still running %d s after the stop request: handing it back "
                             "to the queue", self.name, job.id, current_settings().shutdown_grace)
            self._handing_back = job.id
            self.kill_horse()

    def handle_job_success(self, job: Job, queue: Queue, *args: Any, **kwargs: Any) -> None:
        super().handle_job_success(job, queue, *args, **kwargs)
        self._count(job, "succeeded")
        self._send_callback(job)

    def handle_job_failure(self, job: Job, queue: Queue, started_job_registry: Any = None, exc_string: str = "",
                           execution: Any = None) -> None:
        if self._handing_back != job.id:
            super().handle_job_failure(job, queue, started_job_registry=started_job_registry,
                                       exc_string=exc_string, execution=execution)
            status = job.get_status(refresh=False)
            if status in (JobStatus.FAILED, JobStatus.STOPPED):
                self._count(job, "failed" if status == JobStatus.FAILED else "canceled")
                self._send_callback(job)
            else:
                self._count(job, "retried")
            return
        self._handing_back = None
        job.refresh()
        meta = job.meta or {}
        meta["attempts"] = max(0, int(meta.get("attempts", 1)) - 1)  # a run cut short is not an attempt
        meta["handed_back"] = int(meta.get("handed_back", 0)) + 1
        job.meta = meta
        with self.connection.pipeline() as pipeline:
            self.cleanup_execution(job, pipeline=pipeline, execution=execution)
            job.save_meta()
            if meta.get("function") and not meta["attempts"]:
                pipeline.hincrby(WAITING_KEY, str(meta["function"]), 1)  # waiting for its first run again
            if job.has_rate_limit:
                pipeline.execute()
                self._release_slot_safely(job)
                queue.enqueue_job(job, at_front=True)  # back through RQ's limiter
            else:
                queue._enqueue_job(job, pipeline=pipeline, at_front=True)
                pipeline.execute()
        self.log.info("Worker %s: job %s handed back to the front of queue %s", self.name, job.id, queue.name)

    def _count(self, job: Job, event: str) -> None:
        if job.func_name == JOB_FUNCTION:
            stats.record(self.connection, str((job.meta or {}).get("function", job.description)), event=event)

    def _send_callback(self, job: Job) -> None:
        if job.func_name != JOB_FUNCTION:
            return
        try:
            enqueue_callback(job, current_settings().callback_retry_delays)
        except redis.exceptions.RedisError as exc:
            self.log.error("Worker %s: could not queue the completion callback of job %s: %s", self.name, job.id, exc)

    def clean_registries(self) -> None:
        """RQ's registry maintenance (which retries or fails lost jobs), plus the completion callbacks
        of lost jobs it failed for good, under a maintenance lock that lasts BGFN_LOST_JOB_TIMEOUT
        (RQ's lasts 899 s and outlives a worker killed while cleaning, stopping every sweep)."""
        for queue in self.queues:
            lock_ttl = max(1, current_settings().lost_job_timeout)
            if not self.connection.set(queue.registry_cleaning_key, 1, nx=True, ex=lock_ttl):
                continue
            try:
                self.log.info("Worker %s: cleaning registries for queue: %s", self.name, queue.name)
                started = StartedJobRegistry(queue=queue)
                lost = [j for j in Job.fetch_many(started.get_expired_job_ids(), connection=self.connection,
                                                  serializer=self.serializer)
                        if j is not None and j.get_status(refresh=False) == JobStatus.STARTED]
                clean_registries(queue, self._exc_handlers)
                worker_registration.clean_worker_registry(queue)
                self._requeue_stranded(queue)
                for job in lost:
                    if job.get_status(refresh=True) == JobStatus.FAILED:
                        self.log.warning("Worker %s: job %s was lost with its worker and has no attempt left",
                                         self.name, job.id)
                        self._send_callback(job)
            finally:
                queue.release_maintenance_lock()
        self.last_cleaned_at = now()  # type: ignore[assignment]  # RQ declares it None only

    def _requeue_stranded(self, queue: Queue) -> None:
        """Put back at the front of the queue the jobs a worker took off it (RQ's dequeue moves a job
        to an intermediate list) but never started: the move's reply was lost when Redis went away,
        or the worker died right after it. They are found by the same sweep as lost jobs, stranded
        for BGFN_LOST_JOB_TIMEOUT; nothing ran, so no attempt is counted. (RQ's own cleanup waits a
        minute, then fails such a job as if it had run.)"""
        intermediate = queue.intermediate_queue
        limit = current_settings().lost_job_timeout
        for job_id in intermediate.get_job_ids():  # almost always none
            if job_id in queue.started_job_registry or intermediate.set_first_seen(job_id):
                continue  # running, or seen for the first time now
            first_seen = intermediate.get_first_seen(job_id)
            if first_seen is None or (now() - first_seen).total_seconds() < limit:
                continue
            with self.connection.pipeline() as pipeline:
                pipeline.lrem(intermediate.key, 1, job_id)
                queue.push_job_id(job_id, pipeline=pipeline, at_front=True)
                pipeline.delete(intermediate.get_first_seen_key(job_id))
                pipeline.execute()
            self.log.warning("Worker %s: job %s was taken off queue %s but never started; it is back at the "
                             "front of the queue", self.name, job_id, queue.name)

    @property
    def stop_requested(self) -> bool:
        """Whether SIGTERM/SIGINT asked this worker to stop."""
        return self._stop_deadline is not None

    def handle_work_horse_killed(self, job: Job, retpid: int, ret_val: int, rusage: Any) -> None:
        if self._handing_back != job.id:
            super().handle_work_horse_killed(job, retpid, ret_val, rusage)


REDIS_OUTAGE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.BusyLoadingError)
OUTAGE_WAIT_MAX = 30.0
"""Longest pause between attempts to reach Redis again after it went away (seconds)."""


def _work_through_outages(names: list[str], connection: redis.Redis, *, burst: bool, level: str) -> None:
    """Run one BgfnWorker until it is told to stop, starting a new one whenever Redis went away.

    RQ's work loop quits on a Redis error raised outside its dequeue (mid-job, in maintenance, in
    its heartbeat after a job: rq/worker/base.py `BaseWorker.work`), so a Redis restart would end
    `bgfn worker`. Here the worker waits for Redis to answer again and carries on; the job that was
    running is found by the lost-job sweep and retried.
    """
    wait = 1.0
    while True:
        worker: BgfnWorker | None = None
        try:
            worker = BgfnWorker([make_queue(connection, n) for n in names], connection=connection,
                                serializer=JSONSerializer)
            worker.work(burst=burst, with_scheduler=True, logging_level=level)
            if burst or worker.stop_requested:
                return
            reason = "its work loop ended on an error"
        except REDIS_OUTAGE as exc:
            if burst or (worker is not None and worker.stop_requested):
                raise
            reason = f"{type(exc).__name__}: {exc}"
        except StopRequested:
            return
        log.error("the worker lost Redis (%s); starting it again once Redis answers", reason)
        try:
            while True:
                time.sleep(wait)
                wait = min(wait * 2, OUTAGE_WAIT_MAX)
                try:
                    if connection.ping():
                        break
                except REDIS_OUTAGE as exc:
                    log.warning("Redis is still unavailable (%s); trying again in %.0f s", exc, wait)
        except StopRequested:  # SIGTERM while waiting (the last worker's handler is still installed)
            return
        wait = 1.0


def run_workers(settings: Settings, registry: Registry, connection: redis.Redis, *,
                burst: bool = False) -> None:
    """Run `settings.worker_processes` RQ workers on the queues until stopped (SIGTERM/SIGINT)."""
    set_registry(registry, settings)
    level = settings.log_level
    names = [settings.queue]  # one queue: RQ dequeues it crash-safely (LMOVE); see enqueue_callback
    if settings.worker_processes == 1:
        _work_through_outages(names, connection, burst=burst, level=level)
        return
    pool = WorkerPool(names, connection=connection, num_workers=settings.worker_processes,
                      serializer=JSONSerializer, worker_class=BgfnWorker, queue_class=BgfnQueue)
    pool.start(burst=burst, logging_level=level)
