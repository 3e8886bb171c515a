"""Background jobs as users see them: one JSON view of a job, listing, cancel, replay, purge.

States (RQ's statuses in brackets):

- `queued` [queued, deferred, rate_limited]: waiting for a worker (or for a `concurrency` slot);
- `scheduled` [scheduled]: waiting for its retry delay (or a hand-back) to pass;
- `running` [started]: a worker is running it;
- `succeeded` [finished]: the handler returned; `result` holds its return value;
- `failed` [failed]: no attempt left, or too old to start; `error` says why;
- `canceled` [canceled, stopped]: canceled or stopped on request.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import redis
from rq import Queue
from rq.command import send_stop_job_command
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import (
    BaseRegistry,
    CanceledJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    ScheduledJobRegistry,
    StartedJobRegistry,
)
from rq.serializers import JSONSerializer

from bgfn import defaults

STATE_OF_STATUS = {
    JobStatus.QUEUED: "queued",
    JobStatus.DEFERRED: "queued",
    JobStatus.RATE_LIMITED: "queued",  # held back by RQ's rate limiter (`concurrency`)
    JobStatus.SCHEDULED: "scheduled",
    JobStatus.STARTED: "running",
    JobStatus.FINISHED: "succeeded",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELED: "canceled",
    JobStatus.STOPPED: "canceled",
}
STATES = ("queued", "scheduled", "running", "succeeded", "failed", "canceled")
FINAL_STATES = frozenset({"succeeded", "failed", "canceled"})


class JobNotFound(LookupError):
    """No job has that id (never had, or its record expired)."""


class JobStateError(Exception):
    """The operation does not fit the job's state (e.g. replaying a job that is running)."""


def _iso(value: datetime | float | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, int | float):
        value = datetime.fromtimestamp(value, UTC)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.isoformat().replace("+00:00", "Z")


def is_invocation(job: Job) -> bool:
    """Whether `job` runs a function (rather than delivering a completion callback)."""
    from bgfn.queue import JOB_FUNCTION

    return job.func_name == JOB_FUNCTION


def fetch(connection: redis.Redis, job_id: str) -> Job:
    if not job_id or len(job_id) > 200:
        raise JobNotFound(job_id)
    try:
        return Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
    except NoSuchJobError:
        raise JobNotFound(job_id) from None


def state_of(job: Job) -> str:
    status = job.get_status(refresh=False)
    return STATE_OF_STATUS.get(status, str(status)) if status is not None else "queued"


def _error(job: Job, meta: dict[str, Any]) -> dict[str, str] | None:
    error = meta.get("error")
    if isinstance(error, dict):
        return {"type": str(error.get("type")), "message": str(error.get("message"))}
    result = job.latest_result()
    text = (result.exc_string if result is not None else None) or job.exc_info or ""
    last = next((line for line in reversed(text.strip().splitlines()) if line.strip()), "")
    if not last:
        return None
    kind, sep, message = last.partition(": ")
    if "Work-horse terminated" in text or "AbandonedJobError" in text:
        return {"type": "WorkerLost", "message": "the worker running this job died before it finished: " + last}
    return {"type": kind.rsplit(".", 1)[-1] if sep else "Error", "message": message if sep else last}


def _ended_at(job: Job, meta: dict[str, Any]) -> datetime | float | None:
    """When a final job ended: RQ records no end time for a job canceled while queued, nor for one
    stopped while running; the cancel time, or the time its failure was recorded, stands in."""
    if job.ended_at is not None:
        return job.ended_at
    if meta.get("canceled_at") is not None:
        return float(meta["canceled_at"])
    result = job.latest_result()
    return result.created_at if result is not None else None


def _scheduled_time(job: Job, queue: Queue) -> tuple[datetime | None, bool]:
    """When a scheduled job goes back on the queue (None once it is no longer scheduled), and whether
    it had to be looked up again (then the job may have moved on meanwhile).

    The registry can miss a job whose status says scheduled: RQ writes a retried job's status at
    once but adds it to the scheduled registry in the worker's pipeline, later (milliseconds, more
    on a loaded machine), and the scheduler may have queued the job since its status was read. So
    a miss is looked up again, for at most defaults.SCHEDULED_LOOKUP, while the status still says
    scheduled."""
    registry = ScheduledJobRegistry(queue=queue)
    deadline = time.monotonic() + defaults.SCHEDULED_LOOKUP
    again = False
    while True:
        try:
            return registry.get_scheduled_time(job), again
        except NoSuchJobError:
            if time.monotonic() > deadline or job.get_status(refresh=True) != JobStatus.SCHEDULED:
                return None, True
            again = True
            time.sleep(0.01)


def view(job: Job, queue: Queue | None = None, _reread: int = 0) -> dict[str, Any]:
    """The JSON view of a job: the body of GET /.bgfn/jobs/<id> and of completion callbacks."""
    meta = job.meta or {}
    state = state_of(job)
    data: dict[str, Any] = {
        "id": job.id,
        "function": meta.get("function") or job.description,
        "state": state,
        "accepted_at": _iso(meta.get("accepted_at") or job.created_at),
        "started_at": _iso(job.started_at) if state != "queued" else None,
        "ended_at": _iso(_ended_at(job, meta)) if state in FINAL_STATES else None,
        "attempts": max(int(meta.get("attempts", 0)), 1 if state == "running" else 0),
        "max_attempts": int(meta.get("max_attempts", 1)),
    }
    if state == "scheduled" and queue is not None:
        next_attempt, again = _scheduled_time(job, queue)
        if again and _reread < defaults.VIEW_REREADS:
            # Looked up for a while: the job may have moved on meanwhile (queued by the scheduler, or
            # even run, failed and scheduled again), so the time found may not go with what was read.
            try:
                job.refresh()
            except NoSuchJobError:
                pass  # deleted meanwhile: this view is its last
            else:
                if state_of(job) != "scheduled" or (job.meta or {}).get("attempts") != meta.get("attempts"):
                    return view(job, queue, _reread + 1)
        data["next_attempt_at"] = _iso(next_attempt)
    if state == "succeeded":
        data["result"] = job.return_value()
    if state in ("failed", "canceled", "scheduled"):
        error = _error(job, meta) if state != "canceled" or meta.get("error") else None
        if state == "canceled":
            error = {"type": "Canceled", "message": "the job was canceled on request"}
        data["error"] = error
    data["logs"] = meta.get("logs", "")
    data["logs_truncated"] = bool(meta.get("logs_truncated", False))
    return data


def registries(queue: Queue) -> dict[str, BaseRegistry]:
    return {
        "scheduled": ScheduledJobRegistry(queue=queue),
        "running": StartedJobRegistry(queue=queue),
        "succeeded": FinishedJobRegistry(queue=queue),
        "failed": FailedJobRegistry(queue=queue),
        "canceled": CanceledJobRegistry(queue=queue),
    }


# RQ files a job stopped while running (state canceled) in its failed registry, with status stopped:
# the registries a state's jobs can be found in.
SOURCES = {"failed": ("failed", "canceled"), "canceled": ("canceled", "failed")}


def job_ids(queue: Queue, state: str, limit: int) -> list[str]:
    """Up to `limit` ids of jobs in `state`'s registry (or the queue), newest first."""
    if state == "queued":
        ids = queue.get_job_ids()
        return list(reversed(ids))[:limit]
    registry = registries(queue)[state]
    ids = registry.get_job_ids(0, limit - 1, desc=True)
    if state in FINAL_STATES and ids and len(ids) >= limit:
        # Final jobs are ordered by expiry in whole seconds: add the ties of the last one, so the
        # caller's sort by end time sees every job that may be newer than it.
        last = queue.connection.zscore(registry.key, ids[-1])
        if last is not None:
            entries = queue.connection.zrangebyscore(registry.key, last, last)
            ties = [e.decode() if isinstance(e, bytes) else str(e) for e in entries]
            ids += [job_id for job_id in ties if job_id not in ids]
    return ids


def _newest_first(job: Job) -> float:
    ended = _ended_at(job, job.meta or {})
    if isinstance(ended, datetime):
        return (ended if ended.tzinfo else ended.replace(tzinfo=UTC)).timestamp()
    return float(ended) if ended is not None else 0.0


def _jobs_in(queue: Queue, state: str, limit: int) -> list[Job]:
    """Up to `limit` jobs whose state is `state`, newest first."""
    sources = SOURCES.get(state, (state,))
    ids = [job_id for source in sources for job_id in job_ids(queue, source, limit)]
    found = [job for job in Job.fetch_many(ids, connection=queue.connection, serializer=JSONSerializer)
             if job is not None and state_of(job) == state]
    if state in FINAL_STATES:  # registries order by expiry, in whole seconds: order by end time
        found.sort(key=_newest_first, reverse=True)
    return found


def list_jobs(queue: Queue, *, function: str | None = None, states: Iterable[str] = STATES,
              limit: int = 50) -> list[dict[str, Any]]:
    """Jobs of the queue (of one function, if given), by state, newest first."""
    found: list[dict[str, Any]] = []
    for state in states:
        # A function filter needs the job records: read more ids than asked for when filtering.
        count = 0
        for job in _jobs_in(queue, state, limit if function is None else max(limit * 20, 1000)):
            if not is_invocation(job):
                continue  # a completion-callback delivery: bookkeeping, not a function's job
            if function is not None and (job.meta or {}).get("function", job.description) != function:
                continue
            found.append(view(job, queue))
            count += 1
            if count >= limit:
                break
    return found


def _uncount_waiting(job: Job) -> None:
    from bgfn.queue import WAITING_KEY

    meta = job.meta or {}
    if is_invocation(job) and meta.get("function") and not int(meta.get("attempts", 0)):
        job.connection.hincrby(WAITING_KEY, str(meta["function"]), -1)


def cancel(queue: Queue, job: Job, callback_retry_delays: tuple[int, ...] = ()) -> dict[str, Any]:
    """Cancel a queued or scheduled job; stop a running one. Final jobs are left as they are."""
    from bgfn.queue import enqueue_callback

    state = state_of(job)
    if state in ("queued", "scheduled"):
        job.meta = {**(job.meta or {}), "canceled_at": time.time()}
        job.save_meta()
        job.cancel()
        _uncount_waiting(job)
        enqueue_callback(job, callback_retry_delays)
    elif state == "running":
        send_stop_job_command(queue.connection, job.id, serializer=JSONSerializer)
    else:
        raise JobStateError(f"job {job.id} is {state}; only queued, scheduled or running jobs can be canceled.")
    job.refresh()
    return view(job, queue)


def replay(queue: Queue, job: Job) -> dict[str, Any]:
    """Run a failed or canceled job again, with its full retry policy."""
    state = state_of(job)
    if state not in ("failed", "canceled"):
        raise JobStateError(f"job {job.id} is {state}; only failed or canceled jobs can be retried.")
    meta = job.meta or {}
    retries = int(meta.get("max_attempts", 1)) - 1
    job.retries_left = retries if retries > 0 else None
    meta.pop("error", None)
    meta.pop("canceled_at", None)
    meta["attempts"] = 0
    job.meta = meta
    job.save()
    for registry in (FailedJobRegistry(queue=queue), CanceledJobRegistry(queue=queue)):
        registry.remove(job)
    job.started_at = job.ended_at = None
    queue.enqueue_job(job)
    if meta.get("function"):
        from bgfn.queue import WAITING_KEY

        job.connection.hincrby(WAITING_KEY, str(meta["function"]), 1)  # waits for its first run again
    job.refresh()
    return view(job, queue)


def replay_failed(queue: Queue, function: str | None) -> list[str]:
    """Replay every failed job (of one function, if given); returns their ids."""
    ids = FailedJobRegistry(queue=queue).get_job_ids()
    replayed: list[str] = []
    for job in Job.fetch_many(ids, connection=queue.connection, serializer=JSONSerializer):
        if job is None or not is_invocation(job):
            continue
        if function is not None and (job.meta or {}).get("function") != function:
            continue
        if state_of(job) != "failed":  # stopped on request: canceled, not failed
            continue
        try:
            replay(queue, job)
        except (JobStateError, InvalidJobOperation):
            continue
        replayed.append(job.id)
    return replayed


def purge(queue: Queue, *, function: str | None = None,
          states: Iterable[str] = ("succeeded", "failed", "canceled")) -> int:
    """Delete finished jobs' records (of one function, if given); returns how many."""
    count = 0
    regs = registries(queue)
    states = tuple(states)
    for state in states:
        if state not in FINAL_STATES:
            raise JobStateError(f"cannot purge {state!r} jobs: only succeeded, failed or canceled.")
    for state in states:
        for source in SOURCES.get(state, (state,)):
            registry = regs[source]
            ids = registry.get_job_ids()
            for job_id, job in zip(ids, Job.fetch_many(ids, connection=queue.connection,
                                                       serializer=JSONSerializer), strict=True):
                if job is None:
                    registry.remove(job_id)
                    continue
                if state_of(job) != state:
                    continue
                if function is not None and (job.meta or {}).get("function") != function:
                    continue
                registry.remove(job, delete_job=True)
                count += 1
    return count


def queue_summary(queue: Queue) -> dict[str, Any]:
    """Backpressure at a glance: jobs waiting, the oldest one's age, and per function the invocations
    waiting for their first run and the calls refused by a cap."""
    from bgfn.queue import WAITING_KEY
    from bgfn.stats import JOB_METRICS_KEY

    connection = queue.connection
    with connection.pipeline(transaction=False) as pipe:
        pipe.llen(queue.key)
        pipe.lindex(queue.key, 0)
        pipe.hgetall(WAITING_KEY)
        pipe.hgetall(JOB_METRICS_KEY)
        depth, oldest, waiting, figures = pipe.execute()
    age = None
    if oldest is not None:
        job = Job.fetch_many([oldest.decode()], connection=connection, serializer=JSONSerializer)[0]
        if job is not None and job.enqueued_at is not None:
            enqueued = job.enqueued_at if job.enqueued_at.tzinfo else job.enqueued_at.replace(tzinfo=UTC)
            age = max(0.0, (datetime.now(UTC) - enqueued).total_seconds())
    functions: dict[str, dict[str, int]] = {}
    for name, count in waiting.items():
        functions.setdefault(name.decode(), {"waiting": 0, "refused": 0})["waiting"] = max(0, int(count))
    for field, count in figures.items():
        kind, _, name = field.decode().partition("|")
        if kind == "refused":
            functions.setdefault(name, {"waiting": 0, "refused": 0})["refused"] = int(count)
    return {"queue": queue.name, "depth": int(depth), "oldest_age": age, "functions": functions}
