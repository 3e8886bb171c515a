"""The invoke path's watchdog (bgfn.invoke), driven directly: a call past its limit is answered
by the watchdog at its deadline, never before, whatever limits the calls before it had."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from bgfn.discovery import Function
from bgfn.invoke import Invoker


def _function(name: str, timeout: float, handler: Any) -> Function:
    return Function(name=name, path=Path(f"{name}.py"), handler=handler, is_async=False, background=False,
                    timeout=timeout)


def _answered_after(invoker: Invoker, function: Function) -> tuple[float, float]:
    """Run `function` inline under the watchdog: (seconds until the watchdog answered, until the call returned)."""
    answered = threading.Event()
    started = time.monotonic()
    answered_at: list[float] = []

    def answer_early() -> None:
        answered_at.append(time.monotonic() - started)
        answered.set()

    outcome = invoker.invoke(function, {"httpMethod": "GET"}, "req", answer_early)
    returned = time.monotonic() - started
    assert outcome.timed_out and outcome.error_message == f"Task timed out after {function.timeout:.2f} seconds"
    assert answered.is_set()
    return answered_at[0], returned


def test_the_watchdog_answers_a_call_at_its_deadline_after_calls_with_longer_limits() -> None:
    invoker = Invoker()
    quick = _function("quick", 30.0, lambda event, context: {"statusCode": 200})
    for _ in range(3):  # the watchdog now sleeps toward these 30 s limits
        outcome = invoker.invoke(quick, {"httpMethod": "GET"}, "req", lambda: None)
        assert outcome.ok and not outcome.timed_out

    stuck = _function("stuck", 0.3, lambda event, context: time.sleep(1.0))
    answered, returned = _answered_after(invoker, stuck)
    assert 0.3 <= answered < 0.9  # woken for the shorter limit: not after the 30 s one
    assert returned >= 1.0  # the handler's thread went on; its late return is not a second answer

    # And again with the watchdog already running on the short limit: on time, never early.
    answered, _ = _answered_after(invoker, _function("stuck-again", 0.2, lambda event, context: time.sleep(0.5)))
    assert 0.2 <= answered < 0.45


def test_calls_in_time_are_never_answered_by_the_watchdog() -> None:
    invoker = Invoker()
    early: list[str] = []
    for i in range(50):
        function = _function(f"f{i % 3}", 0.05 + 0.05 * (i % 3), lambda event, context: time.sleep(0.001))
        outcome = invoker.invoke(function, {"httpMethod": "GET"}, f"req-{i}", lambda i=i: early.append(f"req-{i}"))
        assert outcome.ok
    time.sleep(0.2)  # past every deadline above: a missed removal would be answered now
    assert early == []
