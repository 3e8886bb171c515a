"""Background jobs as users see them: one JSON view of a job, listing, cancel, replay, purge.

States (RQ's statuses in brackets):

- `queued` [queued, deferred]: waiting for a worker;
- `scheduled` [scheduled]: waiting for its retry delay (or a hand-back) to pass;
- `running` [started]: a worker is running it;
- `succeeded` [finished]: the handler returned; `result` holds its return value;
- `failed` [failed]: no attempt left, or too old to start; `error` says why;
- `canceled` [canceled, stopped]: canceled or stopped on request.
"""

from __future__ import annotations

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

STATE_OF_STATUS = {
    JobStatus.QUEUED: "queued",
    JobStatus.DEFERRED: "queued",
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


def view(job: Job, queue: Queue | None = None) -> dict[str, Any]:
    """The JSON view of a job: the body of GET /.bgfn/jobs/<id> and of completion callbacks."""
    meta = job.meta or {}
    state = state_of(job)
    data: dict[str, Any] = {
        "id": job.id,
        "function": meta.get("function") or job.description,
        "state": state,
        "accepted_at": _iso(meta.get("accepted_at") or job.created_at),
        "started_at": _iso(job.started_at) if state != "queued" else None,
        "ended_at": _iso(job.ended_at) if state in FINAL_STATES else None,
        "attempts": int(meta.get("attempts", 0)),
        "max_attempts": int(meta.get("max_attempts", 1)),
    }
    if state == "scheduled" and queue is not None:
        try:
            data["next_attempt_at"] = _iso(ScheduledJobRegistry(queue=queue).get_scheduled_time(job))
        except NoSuchJobError:
            data["next_attempt_at"] = None
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


def job_ids(queue: Queue, state: str, limit: int) -> list[str]:
    """Up to `limit` ids of jobs in `state`, newest first."""
    if state == "queued":
        ids = queue.get_job_ids()
        return list(reversed(ids))[:limit]
    return registries(queue)[state].get_job_ids(0, limit - 1, desc=True)


def list_jobs(queue: Queue, *, function: str | None = None, states: Iterable[str] = STATES,
              limit: int = 50) -> list[dict[str, Any]]:
    """Jobs of the queue (of one function, if given), by state, newest first."""
    found: list[dict[str, Any]] = []
    for state in states:
        # A function filter needs the job records: read more ids than asked for when filtering.
        ids = job_ids(queue, state, limit if function is None else max(limit * 20, 1000))
        for job in Job.fetch_many(ids, connection=queue.connection, serializer=JSONSerializer):
            if job is None:
                continue
            if function is not None and (job.meta or {}).get("function", job.description) != function:
                continue
            found.append(view(job, queue))
            if len([j for j in found if j["state"] == state]) >= limit:
                break
    return found


def cancel(queue: Queue, job: Job, callback_retry_delays: tuple[int, ...] = ()) -> dict[str, Any]:
    """Cancel a queued or scheduled job; stop a running one. Final jobs are left as they are."""
    from bgfn.queue import enqueue_callback

    state = state_of(job)
    if state in ("queued", "scheduled"):
        job.cancel()
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
    meta["attempts"] = 0
    job.meta = meta
    job.save()
    for registry in (FailedJobRegistry(queue=queue), CanceledJobRegistry(queue=queue)):
        registry.remove(job)
    job.started_at = job.ended_at = None
    queue.enqueue_job(job)
    job.refresh()
    return view(job, queue)


def replay_failed(queue: Queue, function: str | None) -> list[str]:
    """Replay every failed job (of one function, if given); returns their ids."""
    ids = FailedJobRegistry(queue=queue).get_job_ids()
    replayed: list[str] = []
    for job in Job.fetch_many(ids, connection=queue.connection, serializer=JSONSerializer):
        if job is None or (function is not None and (job.meta or {}).get("function") != function):
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
    for state in states:
        if state not in FINAL_STATES:
            raise JobStateError(f"cannot purge {state!r} jobs: only succeeded, failed or canceled.")
        registry = regs[state]
        ids = registry.get_job_ids()
        for job_id, job in zip(ids, Job.fetch_many(ids, connection=queue.connection, serializer=JSONSerializer),
                               strict=True):
            if job is None:
                registry.remove(job_id)
                continue
            if function is not None and (job.meta or {}).get("function") != function:
                continue
            registry.remove(job, delete_job=True)
            count += 1
    return count
