"""Every default bgfn uses, in one place, each with its unit.

The CLI, the settings table and the README all read these constants; change a default here and
nowhere else.
"""

from __future__ import annotations

FUNCTIONS_DIR = "netlify/functions"
"""Functions directory (relative to the site folder) when netlify.toml names none."""

CONFIG_FILES = ("netlify.toml", "netlify.yaml", "netlify.yml")
"""Site configuration files, in the order they are looked for (the first found is read)."""

BGFN_CONFIG_FILE = "bgfn.toml"
"""bgfn's own per-function settings, beside netlify.toml (keys Netlify does not know)."""

BIND = "127.0.0.1:8888"
"""Address `bgfn serve` listens on: loopback only unless the operator says otherwise."""

WEB_WORKERS = 2
"""gunicorn worker processes for `bgfn serve` (count)."""

WEB_THREADS = 4
"""Threads per gunicorn worker process (count); requests in flight per process."""

WEB_LINGER = 0.002
"""How long a web thread waits on a kept-alive connection for its next request, serving it itself,
before handing the connection back to gunicorn's poller (seconds; 0: never). See bgfn.webworker."""

WORKER_PROCESSES = 1
"""RQ worker processes started by one `bgfn worker` (count)."""

QUEUE = "bgfn"
"""Name of the RQ queue background invocations go to."""

SYNC_TIMEOUT = 30.0
"""Time limit of a synchronous invocation (seconds)."""

BACKGROUND_TIMEOUT = 900
"""Hard time limit of a background run (seconds): Netlify's 15 minutes."""

RETRY_DELAYS = (60, 120)
"""Delays before each retry of a background function that raised (seconds): Netlify's."""

SYNC_BODY_LIMIT = 6 * 1024 * 1024
"""Largest request body of a synchronous invocation (bytes): 6 MiB."""

BACKGROUND_BODY_LIMIT = 256 * 1024
"""Largest request body of a background invocation (bytes): 256 KiB."""

RETRY_AFTER = 5
"""`Retry-After` sent with a 503 when Redis cannot take an invocation (seconds)."""

REDIS_SOCKET_TIMEOUT = 5.0
"""How long a Redis command or connect may take before the web answers 503 (seconds)."""

RESULT_TTL = 7 * 24 * 3600
"""How long the record of a finished background job is kept in Redis (seconds; BGFN_RESULT_TTL).
Redis holds about throughput x this x a record's size (~3-6 KiB for a small event)."""

FAILURE_TTL = 30 * 24 * 3600
"""How long a failed background job is kept in Redis's failed list (seconds; BGFN_FAILURE_TTL)."""

IDEMPOTENCY_WINDOW = 24 * 3600
"""How long an `Idempotency-Key` is remembered for a function (seconds)."""

IDEMPOTENCY_WAIT = 2.0
"""How long a repeated request waits for the first one's job to be stored (seconds)."""

SCHEDULED_LOOKUP = 1.0
"""How long a status read looks for a job that says `scheduled` in RQ's scheduled registry, which a
retried job joins a moment after its status is written (seconds)."""
VIEW_REREADS = 3
"""Times a job's status view is read again when the job moved on while its next attempt was looked up (count)."""

CALLBACK_RETRY_DELAYS = (10, 60, 300, 1800)
"""Delays before each new try of a failed completion-callback delivery (seconds)."""

LOST_JOB_TIMEOUT = 30
"""A running job whose worker stopped heartbeating for this long is treated as lost and retried
(seconds). Workers heartbeat every sixth of it and look for lost jobs every third of it."""

SHUTDOWN_GRACE = 30
"""How long a worker told to stop (SIGTERM) lets its running job finish before handing the job
back to the queue (seconds)."""

JOB_LOG_LIMIT = 64 * 1024
"""Most of what a background run printed or logged that its job record keeps (characters; the
end is kept)."""

HARD_KILL_GRACE = 5
"""Extra time gunicorn gives a stuck request over its function's timeout before killing the
process (seconds); the request is answered 502 at the timeout, this is only the backstop."""

HORSE_KILL_GRACE = 5
"""How long a background job may run past its time limit before the worker kills its work horse
(seconds): the horse's own alarm stops a handler in Python code at the limit; this is the backstop
for one stuck where a signal cannot reach it (a C call, signals blocked)."""

ALARM_REPEAT = 1.0
"""After a background job's time limit the horse's alarm goes off again this often until the job
stops (seconds): a handler (or a library under it) whose `except Exception` swallowed the first
timeout gets another."""

HORSE_MAX_JOBS = 1000
"""Jobs one work horse runs before the worker replaces it with a fresh fork (BGFN_HORSE_MAX_JOBS;
bounds what a leaking handler can accumulate)."""

DEV_DATA_DIR = ".bgfn"
"""Project-local folder `bgfn dev` keeps its embedded Redis data in (relative to the site)."""

REDIS_START_TIMEOUT = 20.0
"""How long to wait for an embedded Redis server to answer PING (seconds)."""

RELOAD_POLL_INTERVAL = 1.0
"""How often `bgfn dev` looks for changed function files (seconds)."""

LOG_LEVEL = "INFO"
"""Log level of bgfn's own loggers."""

MAX_QUEUED = 100_000
"""Most background jobs that may wait in the queue before calls are refused with 429 (count)."""

MAX_QUEUE_AGE = 3600
"""Oldest the first waiting job may be before calls are refused with 429 (seconds)."""

LIMITS_CACHE = 0.1
"""How long a web process reuses a queue-depth reading while far below the caps (seconds); near a
cap (over 90 % of it) every call reads afresh."""

PACED_REFUSALS = 10_000
"""Refused callers a web process remembers when spacing out their Retry-After (each is told to come
back after those before it that have not yet); past this many the oldest are forgotten."""

DRAIN_WINDOW = 10.0
"""Window over which the web estimates the drain rate for Retry-After (seconds)."""

CONTEXT = "production"
"""Deploy context whose `[context.NAME.environment]` applies (`bgfn dev` uses `dev`)."""
