"""Backpressure: caps on what waits, so a burst far above the drain rate is refused (429) instead
of growing the queue, and Redis memory with it, without bound.

- The whole queue: at most BGFN_MAX_QUEUED jobs waiting (in the queue, or held back by RQ's rate
  limiter for a function's `concurrency`), and its oldest job at most BGFN_MAX_QUEUE_AGE seconds old.
- One function: at most `max_queued` of its invocations waiting for their first run (bgfn.toml or
  the module's `config`), counted in one Redis hash that the enqueue increments in its own
  MULTI/EXEC and a worker decrements when it starts the job's first attempt.

One Lua call reads all of it. A web process reuses a reading for defaults.LIMITS_CACHE seconds
while far below the caps, and reads afresh near them. `Retry-After` comes from the drain rate:
the workers count every job they start, and the web compares two readings of that count. Refused
callers are spread out: each web process counts the callers it refused that are still expected
back and puts a new one after them, 1/drain rate each, so a burst of refusals is not told to come
back all in the same second.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime

import redis
from rq.rate_limit import RateLimitRegistry

from bgfn import defaults
from bgfn.discovery import Function
from bgfn.queue import STARTED_KEY, WAITING_KEY
from bgfn.settings import Settings

RATE_LIMIT_PREFIX = "bgfn:"
"""Prefix of the keys bgfn gives RQ's rate limiter (`concurrency`; bgfn.queue)."""

# The depth counts the jobs RQ's rate limiter holds back (a `concurrency` function's excess waits
# in a sorted set, outside the queue's list) so BGFN_MAX_QUEUED bounds them too.
_READ = """
local depth = redis.call('LLEN', KEYS[1])
for _, key in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  if string.sub(key, 1, #ARGV[3]) == ARGV[3] then
    depth = depth + redis.call('ZCARD', ARGV[4] .. key .. ':rate_limited')
  end
end
local waiting = redis.call('HGET', KEYS[2], ARGV[1]) or '0'
local started = redis.call('GET', KEYS[3]) or '0'
local oldest = redis.call('LINDEX', KEYS[1], 0)
local enqueued = false
if oldest then enqueued = redis.call('HGET', ARGV[2] .. oldest, 'enqueued_at') end
return {depth, waiting, started, enqueued or ''}
"""


@dataclass(frozen=True)
class Refusal:
    """A call refused by a cap: which one, the message, and when to try again."""

    error_type: str
    message: str
    retry_after: int


@dataclass
class _Reading:
    at: float
    depth: int
    waiting: int
    oldest_age: float


class Limits:
    """Checks the caps before a background invocation is stored (one per web process)."""

    def __init__(self, connection: redis.Redis, settings: Settings) -> None:
        self.connection = connection
        self.settings = settings
        self.queue_key = f"rq:queue:{settings.queue}"
        self._script = connection.register_script(_READ)
        self._cache: dict[str, _Reading] = {}
        self._lock = threading.Lock()
        self._samples: list[tuple[float, int]] = []
        # When the refused callers still expected back were told to come (monotonic; under self._lock).
        self._promised: deque[float] = deque(maxlen=defaults.PACED_REFUSALS)

    def _read(self, function: str) -> _Reading:
        depth, waiting, started, enqueued = self._script(
            keys=[self.queue_key, WAITING_KEY, STARTED_KEY, RateLimitRegistry.rl_keys_key],
            args=[function, "rq:job:", RATE_LIMIT_PREFIX, "rq:rl:"])
        now = time.time()
        age = 0.0
        if enqueued:
            text = enqueued.decode() if isinstance(enqueued, bytes) else str(enqueued)
            try:
                age = max(0.0, now - datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp())
            except ValueError:
                age = 0.0
        with self._lock:
            self._samples.append((time.monotonic(), int(started)))
            cutoff = time.monotonic() - defaults.DRAIN_WINDOW
            while len(self._samples) > 2 and self._samples[1][0] < cutoff:
                self._samples.pop(0)
        return _Reading(at=time.monotonic(), depth=int(depth), waiting=max(0, int(waiting)), oldest_age=age)

    def drain_rate(self) -> float | None:
        """Jobs started per second over the last readings (None until two readings a second apart)."""
        with self._lock:
            if len(self._samples) < 2:
                return None
            (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        if t1 - t0 < 1.0:
            return None
        return max(0.0, (n1 - n0) / (t1 - t0))

    def _retry_after(self, excess: float) -> int:
        """When a refused call should come back: once the excess over the cap has drained, and after
        the callers this process refused before it that have not come back yet, one per 1/drain
        rate, so that retries return about as fast as the workers free places instead of all at
        once. Worked out afresh from the current excess and rate on every refusal."""
        rate = self.drain_rate()
        if not rate:
            return 60
        now = time.monotonic()
        with self._lock:
            while self._promised and self._promised[0] <= now:
                self._promised.popleft()
            delay = (excess + len(self._promised)) / rate
            self._promised.append(now + delay)
        return max(1, min(3600, math.ceil(delay)))

    def _near(self, reading: _Reading, cap: int | None) -> bool:
        return (reading.depth >= 0.9 * self.settings.max_queued
                or reading.oldest_age >= 0.9 * self.settings.max_queue_age
                or (cap is not None and reading.waiting >= 0.9 * cap))

    def check(self, function: Function) -> Refusal | None:
        """None when the call may be stored; else the cap it hits."""
        cap = function.settings.get("max_queued")
        reading = self._cache.get(function.name)
        if reading is None or self._near(reading, cap) or time.monotonic() - reading.at > defaults.LIMITS_CACHE:
            reading = self._read(function.name)
            self._cache[function.name] = reading
        if reading.depth >= self.settings.max_queued:
            return Refusal("QueueFull", f"The background queue is full: {reading.depth} jobs wait and "
                           f"BGFN_MAX_QUEUED is {self.settings.max_queued}.",
                           self._retry_after(reading.depth - self.settings.max_queued + 1))
        if reading.oldest_age > self.settings.max_queue_age:
            return Refusal("QueueTooOld", f"The oldest waiting job has waited {reading.oldest_age:.0f} s, over "
                           f"BGFN_MAX_QUEUE_AGE = {self.settings.max_queue_age} s.",
                           self._retry_after(reading.depth))
        if cap is not None and reading.waiting >= cap:
            return Refusal("FunctionQueueFull", f"{reading.waiting} invocations of {function.name!r} wait to "
                           f"start and its max_queued is {cap}.", self._retry_after(reading.waiting - cap + 1))
        return None

    def accepted(self, function: Function) -> None:
        """Count a stored invocation in this process's reading (until the next read)."""
        reading = self._cache.get(function.name)
        if reading is not None:
            reading.depth += 1
            reading.waiting += 1


def waiting_counts(connection: redis.Redis) -> dict[str, int]:
    """Invocations waiting for their first run, per function."""
    raw = connection.hgetall(WAITING_KEY)
    return {(k.decode() if isinstance(k, bytes) else str(k)): max(0, int(v)) for k, v in raw.items()}
