"""Scheduled functions (CONTRACT §8): `schedule = "CRON"` (five fields, UTC, or @yearly, @monthly,
@weekly, @daily, @hourly) from `[functions."NAME"]` or the module's `config`.

`bgfn scheduler` (also run by `bgfn dev`) wakes at each tick and stores the invocation as a job on
the queue, where workers run it like a background call (with the function's own time limit: 30 s
by default, as on Netlify, and its retry policy). Several schedulers may run: each tick is claimed
with one atomic `SET NX` per (function, tick), so it is enqueued once. A tick missed while every
scheduler was down is skipped, not caught up: a scheduler starts from the next tick after it starts,
and one that stalls past several ticks runs only the latest.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

import redis
from croniter import croniter

from bgfn import defaults
from bgfn.discovery import Function, Registry
from bgfn.queue import REDIS_ERRORS, BgfnQueue, enqueue_invocation, new_request_id

log = logging.getLogger("bgfn.scheduler")

TICK_KEY = "bgfn:tick:{function}:{tick}"
TICK_TTL = 2 * 24 * 3600
"""How long a claimed tick is remembered (seconds): far longer than any clock skew between schedulers."""


def next_tick(expression: str, after: float) -> float:
    """The first tick strictly after `after` (epoch seconds)."""
    start = datetime.fromtimestamp(after, UTC)
    return float(croniter(expression, start).get_next(float))


def tick_event(function: Function, next_run: float) -> dict[str, object]:
    """The event of a scheduled invocation, as Netlify sends it."""
    body = json.dumps({"next_run": datetime.fromtimestamp(next_run, UTC).isoformat().replace("+00:00", "Z")})
    headers = {"user-agent": "Netlify Clockwork", "x-nf-event": "schedule", "content-type": "application/json"}
    path = f"/.netlify/functions/{function.name}"
    return {
        "path": path, "httpMethod": "POST", "headers": headers,
        "multiValueHeaders": {k: [v] for k, v in headers.items()},
        "queryStringParameters": {}, "multiValueQueryStringParameters": {},
        "body": body, "isBase64Encoded": False, "rawUrl": f"http://localhost{path}", "rawQuery": "",
    }


class Scheduler:
    """Enqueues each due tick of the registry's scheduled functions once across all schedulers."""

    def __init__(self, registry: Registry, queue: BgfnQueue, clock: Callable[[], float] = time.time, *,
                 result_ttl: int = defaults.RESULT_TTL, failure_ttl: int = defaults.FAILURE_TTL) -> None:
        self.queue = queue
        self.clock = clock
        self.result_ttl, self.failure_ttl = result_ttl, failure_ttl
        self.functions = [f for f in registry if f.settings.get("schedule")]
        now = clock()
        self.next: dict[str, float] = {f.name: next_tick(f.settings["schedule"], now) for f in self.functions}

    def run_due(self) -> list[str]:
        """Enqueue every tick due by now (each once across schedulers); returns the job ids this one stored."""
        now = self.clock()
        stored: list[str] = []
        for function in self.functions:
            expression = function.settings["schedule"]
            tick = self.next[function.name]
            if tick > now:
                continue
            following = next_tick(expression, tick)
            while following <= now:  # this scheduler stalled past several ticks: run the latest only
                log.warning("scheduled %s: tick %s skipped (the scheduler was stalled)", function.name,
                            datetime.fromtimestamp(tick, UTC).isoformat())
                tick, following = following, next_tick(expression, following)
            key = TICK_KEY.format(function=function.name, tick=int(tick))
            if self.queue.connection.set(key, "1", nx=True, ex=TICK_TTL):
                job_id = new_request_id()
                enqueue_invocation(self.queue, function, tick_event(function, following), job_id,
                                   result_ttl=self.result_ttl, failure_ttl=self.failure_ttl)
                stored.append(job_id)
                log.info("scheduled %s: tick %s enqueued as job %s", function.name,
                         datetime.fromtimestamp(tick, UTC).isoformat(), job_id,
                         extra={"event": "tick", "function": function.name, "job_id": job_id})
            self.next[function.name] = following
        return stored

    def seconds_to_next(self) -> float:
        if not self.next:
            return 60.0
        return max(0.0, min(self.next.values()) - self.clock())

    def run(self, stop: threading.Event) -> None:
        """Until `stop` is set: sleep to the next tick, enqueue what is due; ride out Redis outages."""
        log.info("scheduler: %d scheduled function(s): %s", len(self.functions),
                 ", ".join(f"{f.name} ({f.settings['schedule']})" for f in self.functions) or "none")
        while not stop.is_set():
            try:
                self.run_due()
            except (*REDIS_ERRORS, redis.exceptions.RedisError) as exc:
                log.error("scheduler: Redis unavailable (%s); retrying in 1 s", exc)
                stop.wait(1.0)
                continue
            stop.wait(min(self.seconds_to_next(), 60.0) + 0.001)
