"""Retry policy of background functions: how many attempts, how long between them, how old an
event may get before it is dropped instead of run.

Defaults are Netlify's: three attempts in all, the retries after 60 s and 120 s. A function sets
its own in bgfn.toml (`[functions."NAME"]`) or in its module's `config`:

    max_attempts = 5                      # attempts in all, the first included
    retry_delays = [10, 60, 300]          # seconds before each retry (the last repeats), or
    retry_backoff = {base = 10, factor = 2, max = 600, jitter = 0.2}
    max_event_age = 3600                  # seconds after the 202; older jobs fail unrun
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bgfn.errors import ConfigError

MAX_ATTEMPTS = 100
"""Most attempts a function may ask for: each retry's delay is stored with its job."""

RETRY_KEYS = frozenset({"max_attempts", "retry_delays", "retry_backoff", "max_event_age"})


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: `base * factor**n` seconds, capped at `max`, spread by ±`jitter`."""

    base: float
    factor: float = 2.0
    max: float = 3600.0
    jitter: float = 0.1

    def delay(self, retry: int, rng: random.Random) -> float:
        raw = min(self.max, self.base * self.factor ** retry)
        spread = raw * self.jitter
        return max(0.0, min(self.max, raw + rng.uniform(-spread, spread)))


@dataclass(frozen=True)
class RetryPolicy:
    """How a background function is retried after it raises, times out or its worker dies."""

    max_attempts: int = 3
    delays: tuple[float, ...] = (60, 120)
    backoff: Backoff | None = None
    max_event_age: float | None = None

    @property
    def retries(self) -> int:
        return self.max_attempts - 1

    def job_delays(self, rng: random.Random | None = None) -> list[int]:
        """The delay before each retry, in whole seconds (jitter drawn now, once per job)."""
        if self.retries <= 0:
            return []
        if self.backoff is not None:
            rng = rng or random.Random()
            return [int(round(self.backoff.delay(n, rng))) for n in range(self.retries)]
        delays = list(self.delays) or [0]
        return [int(round(delays[min(n, len(delays) - 1)])) for n in range(self.retries)]

    def describe(self) -> str:
        if self.retries <= 0:
            return "no retries"
        if self.backoff is not None:
            b = self.backoff
            how = f"backoff {b.base:g} s x{b.factor:g} up to {b.max:g} s (±{b.jitter:.0%})"
        else:
            how = "after " + ", ".join(f"{d:g} s" for d in self.job_delays())
        age = f", dropped after {self.max_event_age:g} s unstarted" if self.max_event_age else ""
        return f"{self.max_attempts} attempts, retries {how}{age}"


def default_policy(delays: tuple[int, ...]) -> RetryPolicy:
    """The server-wide policy: one retry per configured delay (BGFN_RETRY_DELAYS)."""
    return RetryPolicy(max_attempts=len(delays) + 1, delays=tuple(float(d) for d in delays))


def _number(value: Any, where: str, key: str, *, minimum: float = 0.0, example: str = "60") -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
        raise ConfigError(f"{where} {key} = {value!r}: expected a number >= {minimum:g}, e.g. {key} = {example}.")
    return float(value)


def validate_retry_setting(key: str, value: Any, where: str) -> Any:
    """Check one retry key's value; returns it normalised (shared by bgfn.toml and module config)."""
    if key == "max_attempts":
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ATTEMPTS:
            raise ConfigError(f"{where} max_attempts = {value!r}: expected a whole number from 1 to {MAX_ATTEMPTS} "
                              "(attempts in all, the first included), e.g. max_attempts = 3.")
        return value
    if key == "retry_delays":
        if not isinstance(value, list | tuple) or not value:
            raise ConfigError(f"{where} retry_delays = {value!r}: expected a non-empty list of seconds, "
                              "e.g. retry_delays = [60, 120].")
        if any(isinstance(v, bool) or not isinstance(v, int | float) or v < 0 for v in value):
            raise ConfigError(f"{where} retry_delays = {value!r}: expected a list of seconds, each a number >= 0, "
                              "e.g. retry_delays = [60, 120].")
        return tuple(float(v) for v in value)
    if key == "retry_backoff":
        if not isinstance(value, Mapping) or "base" not in value:
            raise ConfigError(f"{where} retry_backoff = {value!r}: expected a table with at least `base`, e.g. "
                              "retry_backoff = {base = 10, factor = 2, max = 600, jitter = 0.2}.")
        unknown = set(value) - {"base", "factor", "max", "jitter"}
        if unknown:
            raise ConfigError(f"{where} retry_backoff: unknown key(s) {sorted(unknown)}; "
                              "known: base, factor, max, jitter.")
        backoff = Backoff(
            base=_number(value["base"], where, "retry_backoff.base", example="10"),
            factor=_number(value.get("factor", 2.0), where, "retry_backoff.factor", minimum=1.0, example="2"),
            max=_number(value.get("max", 3600.0), where, "retry_backoff.max", example="600"),
            jitter=_number(value.get("jitter", 0.1), where, "retry_backoff.jitter", example="0.2"),
        )
        if backoff.jitter > 1:
            raise ConfigError(f"{where} retry_backoff.jitter = {value['jitter']!r}: expected a fraction from 0 to 1, "
                              "e.g. retry_backoff.jitter = 0.2.")
        return backoff
    if key == "max_event_age":
        return _number(value, where, "max_event_age", minimum=1.0, example="3600")
    raise KeyError(key)


def policy_from_settings(settings: Mapping[str, Any], default: RetryPolicy) -> RetryPolicy:
    """Combine a function's validated settings with the server default."""
    if not RETRY_KEYS & set(settings):
        return default
    backoff = settings.get("retry_backoff")
    delays = settings.get("retry_delays")
    if backoff is not None and delays is not None:
        raise ConfigError("retry_delays and retry_backoff are both set for one function: keep one.")
    max_attempts = settings.get("max_attempts")
    if max_attempts is None:
        max_attempts = len(delays) + 1 if delays is not None else default.max_attempts
    return RetryPolicy(max_attempts=max_attempts,
                       delays=delays if delays is not None else default.delays,
                       backoff=backoff, max_event_age=settings.get("max_event_age", default.max_event_age))
