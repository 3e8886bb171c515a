"""The queue: Redis connections and storing background invocations as RQ jobs.

Jobs use RQ's JSON serializer (never pickle). A job's function is :func:`bgfn.worker.run_job`,
its arguments the function name, the event and the invocation's metadata, so any worker that
loads the same functions can rebuild the event.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import time
import zlib
from typing import Any

import hiredis
import redis
from redis.typing import EncodableT, FieldT
from rq import Queue, RateLimit, Retry
from rq.job import Job
from rq.serializers import JSONSerializer

from bgfn import defaults
from bgfn.callbacks import DELIVERY_FUNCTION
from bgfn.discovery import Function
from bgfn.errors import ConfigError, QueueUnavailable

JOB_FUNCTION = "bgfn.worker.run_job"
JOB_KEY_PREFIX = Job.redis_job_namespace_prefix
WAITING_KEY = "bgfn:waiting"
"""Hash: function name -> invocations stored and not yet started (first attempt); see bgfn.limits."""
STARTED_KEY = "bgfn:started"
"""Counter of jobs the workers have started: its rate is the drain rate (bgfn.limits)."""

REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                redis.exceptions.BusyLoadingError, redis.exceptions.ReadOnlyError,
                redis.exceptions.ResponseError)


def connect(url: str) -> redis.Redis:
    """A Redis client for `url` with bounded timeouts, so an unreachable Redis fails fast."""
    try:
        return redis.Redis.from_url(url, socket_connect_timeout=defaults.REDIS_SOCKET_TIMEOUT,
                                    socket_timeout=defaults.REDIS_SOCKET_TIMEOUT, health_check_interval=30)
    except ValueError as exc:
        raise ConfigError(f"REDIS_URL {url!r} is not a Redis URL ({exc}). Use e.g. redis://127.0.0.1:6379/0 "
                          "or unix:///path/to/redis.sock.") from None


# Stores one invocation: RQ's enqueue writes (the queue's registration, the job hash, its queue
# entry) and the function's waiting count, atomically, in one command with one reply.
_STORE = """
redis.call('SADD', KEYS[1], KEYS[3])
redis.call('HSET', KEYS[2], unpack(ARGV, 3))
redis.call('RPUSH', KEYS[3], ARGV[1])
redis.call('HINCRBY', KEYS[4], ARGV[2], 1)
return 1
"""
_STORE_SHA = hashlib.sha1(_STORE.encode("utf-8")).hexdigest()  # the script's name for EVALSHA


class BgfnQueue(Queue):
    """RQ's queue, with delayed jobs (retries) never due early."""

    def schedule_job(self, job: Job, datetime: dt.datetime, pipeline: Any = None, unique: bool = False) -> Job:
        # RQ keeps a scheduled time in whole seconds, cutting the fraction off, so "after 60 s" could
        # run at 59.1 s; round it up instead (due at most a second late, never early).
        if datetime.microsecond:
            datetime = datetime.replace(microsecond=0) + dt.timedelta(seconds=1)
        return super().schedule_job(job, datetime, pipeline=pipeline, unique=unique)


def make_queue(connection: redis.Redis, name: str) -> BgfnQueue:
    return BgfnQueue(name, connection=connection, serializer=JSONSerializer)


def new_request_id() -> str:
    """A random (version 4) UUID in its text form, from 16 bytes of os.urandom: unguessable.
    (`str(uuid.uuid4())` makes the same, at three times the cost.)"""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # RFC 4122 variant
    x = raw.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"


def retry_policy(delays: list[int]) -> Retry | None:
    return Retry(max=len(delays), interval=delays) if delays else None


def job_fields(queue: Queue, function: Function, event: dict[str, Any], request_id: str, accepted_at: float, *,
               callback_url: str | None = None, result_ttl: int = defaults.RESULT_TTL,
               failure_ttl: int = defaults.FAILURE_TTL) -> dict[FieldT, EncodableT]:
    """The hash RQ's `Job.save` would store for this invocation, queued: the same fields with the
    same encodings (JSON serializer, zlib-compressed data, RQ's timestamps), built without RQ's Job
    object, whose construction and `to_dict` were most of a 202's CPU. RQ reads it back like any of
    its own jobs; tests/test_queue.py compares it field by field with what `enqueue_call` stores."""
    args = _job_args(function, event, request_id, accepted_at)
    stamp = dt.datetime.fromtimestamp(accepted_at, dt.UTC).strftime(RQ_TIMESTAMP)
    fields: dict[FieldT, EncodableT] = {
        "created_at": stamp,
        "data": compress(json.dumps([JOB_FUNCTION, None, args, {}]).encode("utf-8")),
        "success_callback_name": "", "failure_callback_name": "", "stopped_callback_name": "",
        "started_at": "", "ended_at": "", "last_heartbeat": "", "worker_name": "", "group_id": "",
    }
    delays = function.retry.job_delays()
    if delays:
        fields["retries_left"] = len(delays)
        fields["retry_intervals"] = json.dumps(delays)
    fields.update(origin=queue.name, description=function.name, enqueued_at=stamp, timeout=_job_timeout(function),
                  result_ttl=result_ttl, failure_ttl=failure_ttl,
                  status="queued", meta=json.dumps(job_meta(function, accepted_at, callback_url)).encode("utf-8"))
    return fields


def _job_args(function: Function, event: dict[str, Any], request_id: str, accepted_at: float) -> list[Any]:
    """The arguments of :data:`JOB_FUNCTION` for one invocation."""
    return [function.name, event, {"request_id": request_id, "accepted_at": accepted_at}]


def _job_timeout(function: Function) -> int:
    """RQ's job timeout (whole seconds, at least 1) for a function's time limit."""
    return max(1, int(round(function.timeout)))


def job_meta(function: Function, accepted_at: float, callback_url: str | None) -> dict[str, Any]:
    """What bgfn keeps in an invocation's RQ `meta`."""
    meta: dict[str, Any] = {"function": function.name, "accepted_at": accepted_at,
                            "max_attempts": function.retry.max_attempts}
    if callback_url is not None:
        meta["callback_url"] = callback_url
    return meta


def compress(data: bytes) -> bytes:
    """zlib, as RQ stores a job's data, with the window and memory sized to the data: the same bytes
    out, but `zlib.compress`'s defaults set up ~256 KiB per call, which for a small event cost
    more than building the rest of the job (~85 vs ~15 µs here for 0.5 KiB)."""
    bits = min(15, max(9, (len(data) - 1).bit_length()))  # a window as large as the data is as good as any
    compressor = zlib.compressobj(6, zlib.DEFLATED, bits, max(1, min(8, bits - 7)))
    return compressor.compress(data) + compressor.flush()


RQ_TIMESTAMP = "%Y-%m-%dT%H:%M:%S.%fZ"
"""RQ's timestamp format (rq.utils.utcformat)."""


def enqueue_invocation(queue: BgfnQueue, function: Function, event: dict[str, Any], request_id: str, *,
                       callback_url: str | None = None, result_ttl: int = defaults.RESULT_TTL,
                       failure_ttl: int = defaults.FAILURE_TTL) -> str:
    """Store one background invocation as an RQ job (one atomic write); returns its id only once
    Redis has it.

    Raises :class:`QueueUnavailable` when Redis cannot take it.
    """
    accepted_at = time.time()
    concurrency = function.settings.get("concurrency")
    try:
        if concurrency is not None:
            # RQ's rate limiter holds the job back while `concurrency` of the function's jobs run; it
            # takes no pipeline, so this path costs a second round trip.
            queue.enqueue_call(JOB_FUNCTION, rate_limit=RateLimit(f"bgfn:{function.name}", concurrency),
                               args=_job_args(function, event, request_id, accepted_at),
                               timeout=_job_timeout(function), result_ttl=result_ttl,
                               failure_ttl=failure_ttl, description=function.name, job_id=request_id,
                               retry=retry_policy(function.retry.job_delays()),
                               meta=job_meta(function, accepted_at, callback_url))
            queue.connection.hincrby(WAITING_KEY, function.name, 1)
            return request_id
        fields = job_fields(queue, function, event, request_id, accepted_at, callback_url=callback_url,
                            result_ttl=result_ttl, failure_ttl=failure_ttl)
        # One round trip, atomic (a MULTI/EXEC of the same writes costs a reply per command to parse).
        _store(queue, [queue.redis_queues_keys, JOB_KEY_PREFIX + request_id, queue.key, WAITING_KEY],
               [request_id, function.name, *(x for pair in fields.items() for x in pair)])
        return request_id
    except REDIS_ERRORS as exc:
        raise QueueUnavailable(f"Redis did not take the job: {type(exc).__name__}: {exc}") from exc


def _store(queue: BgfnQueue, keys: list[str], args: list[Any]) -> None:
    """Run the store script on one of the client's pooled connections, sent once.

    Not through the client's command call, whose wrappers (retry, observability, the parse of
    options) cost ~40 µs of a ~190 µs store here, nor through its packer (below). The pool still
    hands out a live connection (it reconnects one that Redis closed) and the connection still
    checks its health. The command is never sent twice: if its reply is lost the job may be stored,
    and a resend would queue it again.
    """
    pool = queue.connection.connection_pool
    connection = pool.get_connection()
    try:
        try:
            # hiredis packs it directly: redis-py's packer first copies and checks every argument
            # (~21 against ~7 µs for a job's ~45 arguments)
            command = hiredis.pack_command(("EVALSHA", _STORE_SHA, len(keys), *keys, *args))
            connection.send_packed_command([command])
            connection.read_response()
        except redis.exceptions.NoScriptError:  # a restarted Redis: nothing ran; EVAL caches it again
            connection.send_command("EVAL", _STORE, len(keys), *keys, *args)
            connection.read_response()
    except BaseException:
        connection.disconnect()  # a reply may be half read: never reuse it
        raise
    finally:
        pool.release(connection)


def enqueue_callback(job: Job, retry_delays: tuple[int, ...]) -> Job | None:
    """Queue the delivery of `job`'s completion callback, if it asked for one. The delivery's record
    is kept as long as the invocation's (which the web stored with BGFN_RESULT_TTL / BGFN_FAILURE_TTL)."""
    url = (job.meta or {}).get("callback_url")
    if not url:
        return None
    # Same queue as the invocations: a worker listening to one queue dequeues with RQ's crash-safe LMOVE
    # (with several queues RQ falls back to BLPOP, which can lose a job popped by a worker killed then).
    deliveries = make_queue(job.connection, job.origin)
    return deliveries.enqueue_call(
        DELIVERY_FUNCTION, args=(job.id, url), timeout=60, retry=retry_policy(list(retry_delays)),
        result_ttl=job.result_ttl if job.result_ttl is not None else defaults.RESULT_TTL,
        failure_ttl=job.failure_ttl if job.failure_ttl is not None else defaults.FAILURE_TTL,
        description=f"callback for job {job.id}", meta={"callback_for": job.id},
    )
