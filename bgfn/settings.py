"""Server settings: one table, one precedence.

Each setting has a default (from :mod:`bgfn.defaults`), an environment variable and, for most, a
command-line flag. Precedence, lowest to highest:

1. the default in :mod:`bgfn.defaults`;
2. the environment variable (`REDIS_URL`, `BGFN_*`);
3. the command-line flag.

Server settings never live in netlify.toml: Netlify reads every unknown key under `[functions]`
as a function name, so the same file must stay valid for Netlify.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bgfn import defaults
from bgfn.errors import ConfigError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise ValueError
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise ValueError
    return value


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError


def _delays(text: str) -> tuple[int, ...]:
    if not text.strip():
        return ()
    values = tuple(int(part) for part in text.split(","))
    if any(v < 0 for v in values):
        raise ValueError
    return values


def _bind(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError
    return text


def _networks(text: str) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(p.strip(), strict=False) for p in text.split(",") if p.strip())


def _hosts(text: str) -> tuple[str, ...]:
    hosts = tuple(h.strip().lower() for h in text.split(",") if h.strip())
    if any("/" in h or ":" in h or " " in h for h in hosts):
        raise ValueError
    return hosts


def _secret(text: str) -> str:
    if len(text.strip()) < 16:
        raise ValueError
    return text.strip()


def _lost_timeout(text: str) -> int:
    value = int(text)
    if value < 3:
        raise ValueError
    return value


def _log_format(text: str) -> str:
    value = text.strip().lower()
    if value not in ("text", "json"):
        raise ValueError
    return value


def _text(text: str) -> str:
    if not text.strip():
        raise ValueError
    return text.strip()


def _log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError
    return level


@dataclass(frozen=True)
class Setting:
    """One row of the settings table."""

    name: str
    env: str
    parse: Callable[[str], Any]
    expected: str
    example: str
    help: str
    flag: str | None = None


SETTINGS: tuple[Setting, ...] = (
    Setting("site", "BGFN_SITE", Path, "a folder", "BGFN_SITE=./my-site",
            "Site folder: the one holding netlify.toml.", "--site"),
    Setting("redis_url", "REDIS_URL", _text, "a Redis URL", "REDIS_URL=redis://127.0.0.1:6379/0",
            "Redis for background jobs. `bgfn dev` starts an embedded one when unset.", "--redis-url"),
    Setting("bind", "BGFN_BIND", _bind, "HOST:PORT", "BGFN_BIND=127.0.0.1:8888",
            "Address `bgfn serve` listens on.", "--bind"),
    Setting("web_workers", "BGFN_WEB_WORKERS", _positive_int, "a whole number >= 1", "BGFN_WEB_WORKERS=4",
            "gunicorn worker processes of `bgfn serve`.", "--workers"),
    Setting("web_threads", "BGFN_WEB_THREADS", _positive_int, "a whole number >= 1", "BGFN_WEB_THREADS=4",
            "Threads per gunicorn worker process.", "--threads"),
    Setting("web_linger", "BGFN_WEB_LINGER", _non_negative_float, "a number of seconds >= 0", "BGFN_WEB_LINGER=0.002",
            "How long a web thread waits for a kept-alive connection's next request (seconds); 0: never.", None),
    Setting("worker_processes", "BGFN_WORKER_PROCESSES", _positive_int, "a whole number >= 1",
            "BGFN_WORKER_PROCESSES=2", "RQ worker processes of one `bgfn worker`.", "--processes"),
    Setting("queue", "BGFN_QUEUE", _text, "a queue name", "BGFN_QUEUE=bgfn",
            "RQ queue background invocations go to.", "--queue"),
    Setting("sync_timeout", "BGFN_SYNC_TIMEOUT", _positive_float, "a number of seconds > 0",
            "BGFN_SYNC_TIMEOUT=30", "Default time limit of a synchronous invocation (seconds).", None),
    Setting("background_timeout", "BGFN_BACKGROUND_TIMEOUT", _positive_int, "a whole number of seconds >= 1",
            "BGFN_BACKGROUND_TIMEOUT=900", "Hard time limit of a background run (seconds).", None),
    Setting("retry_delays", "BGFN_RETRY_DELAYS", _delays, "comma-separated whole seconds (or empty)",
            "BGFN_RETRY_DELAYS=60,120",
            "Delays before each retry of a background function that raised; empty means no retries.", None),
    Setting("dev", "BGFN_DEV", _bool, "true or false", "BGFN_DEV=true",
            "Development mode: error traces in 502 answers.", None),
    Setting("trusted_proxies", "BGFN_TRUSTED_PROXIES", _networks, "comma-separated IPs or CIDRs",
            "BGFN_TRUSTED_PROXIES=127.0.0.1,10.0.0.0/8",
            "Peers whose X-Forwarded-For sets the client-ip header.", None),
    Setting("admin_token", "BGFN_ADMIN_TOKEN", _secret, "a secret of at least 16 characters",
            "BGFN_ADMIN_TOKEN=$(openssl rand -hex 32)",
            "Bearer token of the admin endpoints under /.bgfn/admin/; unset: they are off.", None),
    Setting("idempotency_window", "BGFN_IDEMPOTENCY_WINDOW", _positive_int, "a whole number of seconds >= 1",
            "BGFN_IDEMPOTENCY_WINDOW=86400",
            "How long an Idempotency-Key is remembered per function (seconds).", None),
    Setting("callback_hosts", "BGFN_CALLBACK_HOSTS", _hosts, "comma-separated host names (globs allowed)",
            "BGFN_CALLBACK_HOSTS=hooks.example.com,*.internal.example.com",
            "Hosts completion callbacks may be sent to; unset: no callbacks.", None),
    Setting("callback_secret", "BGFN_CALLBACK_SECRET", _secret, "a secret of at least 16 characters",
            "BGFN_CALLBACK_SECRET=$(openssl rand -hex 32)",
            "HMAC-SHA256 key that signs completion callbacks; unset: no callbacks.", None),
    Setting("callback_retry_delays", "BGFN_CALLBACK_RETRY_DELAYS", _delays,
            "comma-separated whole seconds (or empty)", "BGFN_CALLBACK_RETRY_DELAYS=10,60,300,1800",
            "Delays before each new try of a callback delivery that failed (seconds).", None),
    Setting("lost_job_timeout", "BGFN_LOST_JOB_TIMEOUT", _lost_timeout, "a whole number of seconds >= 3",
            "BGFN_LOST_JOB_TIMEOUT=30",
            "A running job whose worker stopped heartbeating this long is retried (seconds).", None),
    Setting("shutdown_grace", "BGFN_SHUTDOWN_GRACE", _positive_int, "a whole number of seconds >= 1",
            "BGFN_SHUTDOWN_GRACE=30",
            "How long a worker told to stop lets its job finish before handing it back (seconds).", None),
    Setting("result_ttl", "BGFN_RESULT_TTL", _positive_int, "a whole number of seconds >= 1",
            "BGFN_RESULT_TTL=604800",
            "How long a finished job's record (status, result, logs) is kept in Redis (seconds).", None),
    Setting("failure_ttl", "BGFN_FAILURE_TTL", _positive_int, "a whole number of seconds >= 1",
            "BGFN_FAILURE_TTL=2592000",
            "How long a failed job stays in the failed list, replayable (seconds).", None),
    Setting("horse_max_jobs", "BGFN_HORSE_MAX_JOBS", _positive_int, "a whole number >= 1",
            "BGFN_HORSE_MAX_JOBS=1000",
            "Jobs one work horse runs before the worker forks a fresh one (1: a fork per job, as RQ).", None),
    Setting("context", "BGFN_CONTEXT", _text, "a deploy context name", "BGFN_CONTEXT=production",
            "Deploy context whose [context.NAME.environment] applies (`bgfn dev`: dev).", None),
    Setting("max_queued", "BGFN_MAX_QUEUED", _positive_int, "a whole number >= 1", "BGFN_MAX_QUEUED=100000",
            "Most background jobs waiting in the queue; past it calls are answered 429.", None),
    Setting("max_queue_age", "BGFN_MAX_QUEUE_AGE", _positive_int, "a whole number of seconds >= 1",
            "BGFN_MAX_QUEUE_AGE=3600",
            "Oldest a waiting job may get before new calls are answered 429 (seconds).", None),
    Setting("log_format", "BGFN_LOG_FORMAT", _log_format, "text or json", "BGFN_LOG_FORMAT=json",
            "Log lines as text, or as JSON objects one per line.", None),
    Setting("log_level", "BGFN_LOG_LEVEL", _log_level, "DEBUG, INFO, WARNING or ERROR", "BGFN_LOG_LEVEL=INFO",
            "Level of bgfn's log lines.", "--log-level"),
)


EMPTY_ALLOWED = frozenset({"retry_delays", "callback_retry_delays", "callback_hosts"})


@dataclass(frozen=True)
class Settings:
    """Resolved server settings. Build with :meth:`load`; every field has a default."""

    site: Path = Path(".")
    redis_url: str | None = None
    bind: str = defaults.BIND
    web_workers: int = defaults.WEB_WORKERS
    web_threads: int = defaults.WEB_THREADS
    web_linger: float = defaults.WEB_LINGER
    worker_processes: int = defaults.WORKER_PROCESSES
    queue: str = defaults.QUEUE
    sync_timeout: float = defaults.SYNC_TIMEOUT
    background_timeout: int = defaults.BACKGROUND_TIMEOUT
    retry_delays: tuple[int, ...] = defaults.RETRY_DELAYS
    dev: bool = False
    trusted_proxies: tuple[Network, ...] = field(default_factory=tuple)
    admin_token: str | None = field(default=None, repr=False)
    idempotency_window: int = defaults.IDEMPOTENCY_WINDOW
    callback_hosts: tuple[str, ...] = ()
    callback_secret: str | None = field(default=None, repr=False)
    callback_retry_delays: tuple[int, ...] = defaults.CALLBACK_RETRY_DELAYS
    lost_job_timeout: int = defaults.LOST_JOB_TIMEOUT
    shutdown_grace: int = defaults.SHUTDOWN_GRACE
    horse_max_jobs: int = defaults.HORSE_MAX_JOBS
    result_ttl: int = defaults.RESULT_TTL
    failure_ttl: int = defaults.FAILURE_TTL
    context: str = defaults.CONTEXT
    max_queued: int = defaults.MAX_QUEUED
    max_queue_age: int = defaults.MAX_QUEUE_AGE
    log_format: str = "text"
    log_level: str = defaults.LOG_LEVEL

    @classmethod
    def load(cls, flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
        """Resolve defaults, then the environment, then command-line flags (a None flag is unset)."""
        import os

        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            raw = env.get(setting.env)
            if raw is not None and (raw.strip() or setting.name in EMPTY_ALLOWED):
                values[setting.name] = _parse(setting, raw, "environment variable " + setting.env)
        for name, value in (flags or {}).items():
            if value is None:
                continue
            setting = _by_name(name)
            if isinstance(value, str):
                value = _parse(setting, value, f"option {setting.flag or name}")
            values[name] = value
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def as_environ(self) -> dict[str, str]:
        """The environment variables that reproduce these settings in a child process."""
        env: dict[str, str] = {}
        for setting in SETTINGS:
            value = getattr(self, setting.name)
            if value is None:
                continue
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, tuple):
                text = ",".join(str(v) for v in value)
            else:
                text = str(value)
            env[setting.env] = text
        return env


def _by_name(name: str) -> Setting:
    for setting in SETTINGS:
        if setting.name == name:
            return setting
    raise KeyError(name)


def _parse(setting: Setting, raw: str, where: str) -> Any:
    try:
        return setting.parse(raw)
    except ValueError:
        raise ConfigError(
            f"{where} is {raw!r}: expected {setting.expected}. Fix it, e.g. {setting.example}"
        ) from None
