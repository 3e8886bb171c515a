"""Idempotency keys: a repeated `Idempotency-Key` for the same function within the window is
answered with the first job's id instead of enqueuing again.

The first request claims the key with one atomic `SET NX EX` naming its job id, then enqueues.
A concurrent repeat that loses the claim answers with the winner's job id once that job exists in
Redis (a 202 always means the job is stored); if the winner could not store it, the claim is
released and the repeat is told to try again.
"""

from __future__ import annotations

import hashlib
import time

import redis

KEY_PREFIX = "bgfn:idempotency:"
MAX_KEY_LENGTH = 255
JOB_KEY_PREFIX = "rq:job:"


class IdempotencyKeyError(ValueError):
    """The header's value cannot be used as a key."""


def redis_key(function: str, key: str) -> str:
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise IdempotencyKeyError(
            f"Idempotency-Key {key[:60]!r} is not usable: send 1 to {MAX_KEY_LENGTH} printable characters, "
            "e.g. a UUID.")
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
    return f"{KEY_PREFIX}{function}:{digest}"


def claim(connection: redis.Redis, function: str, key: str, job_id: str, window: int) -> str | None:
    """Claim `key` for `job_id`. Returns None when claimed, else the job id that holds it."""
    name = redis_key(function, key)
    if connection.set(name, job_id, nx=True, ex=window):
        return None
    holder = connection.get(name)
    if holder is None:  # expired between the two commands: claim again
        return claim(connection, function, key, job_id, window)
    return holder.decode() if isinstance(holder, bytes) else str(holder)


def release(connection: redis.Redis, function: str, key: str, job_id: str) -> None:
    """Give the key up after the job could not be stored (only if `job_id` still holds it)."""
    name = redis_key(function, key)
    holder = connection.get(name)
    if holder is not None and (holder.decode() if isinstance(holder, bytes) else holder) == job_id:
        connection.delete(name)


def wait_stored(connection: redis.Redis, job_id: str, timeout: float) -> bool:
    """Whether the job that holds a key is in Redis, waiting up to `timeout` seconds for it."""
    deadline = time.monotonic() + timeout
    while True:
        if connection.exists(JOB_KEY_PREFIX + job_id):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
