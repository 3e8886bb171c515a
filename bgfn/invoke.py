"""The invoke path: run a handler with a time limit, in-process.

A handler must be answered `502 TimeoutError` at its time limit even when it is stuck (Python
cannot stop a thread). Two ways, by what the caller can do:

- Served by gunicorn (the caller passes `answer_early`): the handler runs inline in the request
  thread, and a watchdog thread per process answers an overrunning one itself at its deadline
  through `answer_early` (bgfn.app writes the 502 on the client's socket and closes it). This costs
  no thread hand-off per call. The watchdog sleeps until the earliest deadline it could have to
  meet (a call starting later has a later one), so it does not wake while calls finish in time.
- Otherwise (the Flask test client, `bgfn invoke`): the handler runs on a runner thread and the
  calling thread stops waiting at the limit.

Either way the `on_stuck` callback lets the host recycle the process: under gunicorn the worker
finishes its other requests and is replaced (bgfn.server ends it even if the stuck thread never
returns), and gunicorn's own timeout kills it if the handler holds the GIL.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bgfn.discovery import Function
from bgfn.event import LambdaContext

log = logging.getLogger("bgfn.invoke")


@dataclass(frozen=True)
class Outcome:
    """What became of one invocation: a return value, a raised error, or a timeout."""

    value: Any = None
    error_type: str | None = None
    error_message: str | None = None
    trace: list[str] | None = None
    timed_out: bool = False
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error_type is None and not self.timed_out


def timeout_message(timeout: float) -> str:
    return f"Task timed out after {timeout:.2f} seconds"


def call_handler(function: Function, event: dict[str, Any], context: LambdaContext,
                 runner: asyncio.Runner | None = None) -> Any:
    """Call the handler in this thread; an `async def` handler runs to completion on an event loop."""
    if function.is_async:
        coroutine = function.handler(event, context)
        if runner is not None:
            return runner.run(coroutine)
        return asyncio.run(coroutine)
    result = function.handler(event, context)
    if asyncio.iscoroutine(result):  # a sync callable returning an awaitable (e.g. a decorated handler)
        return runner.run(result) if runner is not None else asyncio.run(result)
    return result


def describe_error(exc: BaseException) -> tuple[str, str, list[str]]:
    return type(exc).__name__, str(exc), traceback.format_exception(exc)


class _Runner:
    """A daemon thread that runs one call at a time."""

    def __init__(self) -> None:
        self.inbox: queue.SimpleQueue[tuple[Callable[[], Any], _Slot]] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name="bgfn-runner", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        with asyncio.Runner() as loop_runner:
            self.loop_runner = loop_runner
            while True:
                work, slot = self.inbox.get()
                try:
                    slot.value = work()
                except BaseException as exc:  # noqa: B036 - the handler's failure is reported, not raised
                    slot.error = exc
                slot.done.release()


class _Slot:
    """One call's outcome; `done` is held until the runner has filled it in (a bare lock: waiting on
    it costs a fraction of a threading.Event's Python-level condition)."""

    __slots__ = ("done", "value", "error")

    def __init__(self) -> None:
        self.done = threading.Lock()
        self.done.acquire()
        self.value: Any = None
        self.error: BaseException | None = None


WATCH_SLACK = 0.001
"""The watchdog's shortest sleep (seconds), so a deadline a hair away is not polled for in a loop."""
WATCH_LONGEST = 60.0
"""The watchdog's longest sleep (seconds)."""


class _Call:
    """A handler call in flight in a request thread, as the watchdog sees it."""

    __slots__ = ("function", "request_id", "deadline", "answer_early", "expired", "answered")

    def __init__(self, function: Function, request_id: str, deadline: float,
                 answer_early: Callable[[], None]) -> None:
        self.function = function
        self.request_id = request_id
        self.deadline = deadline
        self.answer_early = answer_early
        self.expired = False
        self.answered = threading.Lock()  # held by the watchdog while it answers


class Invoker:
    """Runs handlers with time limits: inline under a watchdog, or on a pool of runner threads
    (threads are created per process, lazily)."""

    def __init__(self, on_stuck: Callable[[Function], None] | None = None) -> None:
        self._on_stuck = on_stuck
        self._idle: list[_Runner] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._inflight: dict[int, _Call] = {}
        self._watchdog: threading.Thread | None = None
        self._wake = threading.Event()
        self._next_wake = 0.0  # when the watchdog will look next (monotonic; under self._lock)
        self._shortest = float("inf")  # the shortest time limit seen (seconds; under self._lock)
        self._local = threading.local()

    def _take(self) -> _Runner:
        with self._lock:
            self._after_fork()
            return self._idle.pop() if self._idle else _Runner()

    def _after_fork(self) -> None:
        """Forget the parent's threads in a forked child (call with self._lock held)."""
        if self._pid != os.getpid():
            self._idle, self._inflight, self._watchdog, self._pid = [], {}, None, os.getpid()
            self._wake, self._next_wake, self._shortest = threading.Event(), 0.0, float("inf")

    def _watch(self, call: _Call) -> None:
        with self._lock:
            self._after_fork()
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch_loop, name="bgfn-watchdog", daemon=True)
                self._watchdog.start()
            self._inflight[id(call)] = call
            self._shortest = min(self._shortest, call.function.timeout)
            if call.deadline < self._next_wake:  # only a call with a shorter limit than any before
                self._wake.set()

    def _finish(self, call: _Call) -> bool:
        """The call returned: True when it did so in time, False when it was already answered 502."""
        with self._lock:
            self._inflight.pop(id(call), None)
            if not call.expired:
                return True
        with call.answered:  # wait for the watchdog's answer to be written before this thread answers
            return False

    def _watch_loop(self) -> None:
        while True:
            overdue: list[_Call] = []
            with self._lock:
                now = time.monotonic()
                # A call that starts from now on ends no sooner than now + the shortest limit seen (a
                # shorter one sets self._wake): sleep until then or the earliest deadline in flight.
                self._next_wake = now + self._shortest
                for key, call in list(self._inflight.items()):
                    if call.deadline <= now:
                        del self._inflight[key]
                        call.expired = True
                        call.answered.acquire()
                        overdue.append(call)
                    else:
                        self._next_wake = min(self._next_wake, call.deadline)
                self._wake.clear()
            for call in overdue:
                try:
                    log.error("function %s (request %s) timed out after %.2f s; answered 502, its thread is "
                              "abandoned", call.function.name, call.request_id, call.function.timeout)
                    call.answer_early()
                except Exception:  # noqa: BLE001 - the client went away; nothing else to do
                    log.exception("could not answer the timed-out request %s", call.request_id)
                finally:
                    call.answered.release()
                if self._on_stuck is not None:
                    self._on_stuck(call.function)
            if not overdue:
                self._wake.wait(min(WATCH_LONGEST, max(WATCH_SLACK, self._next_wake - time.monotonic())))

    def _invoke_inline(self, function: Function, event: dict[str, Any], request_id: str,
                       answer_early: Callable[[], None]) -> Outcome:
        started = time.monotonic()
        context = LambdaContext(function.name, request_id, function.timeout, started=started)
        call = _Call(function, request_id, started + function.timeout, answer_early)
        loop_runner = getattr(self._local, "runner", None)
        if loop_runner is None and function.is_async:
            loop_runner = self._local.runner = asyncio.Runner()
        self._watch(call)
        error: BaseException | None = None
        value: Any = None
        try:
            value = call_handler(function, event, context, loop_runner)
        except BaseException as exc:  # noqa: B036 - the handler's failure is reported, not raised
            error = exc
        in_time = self._finish(call)
        duration = time.monotonic() - started
        if not in_time:
            return Outcome(error_type="TimeoutError", error_message=timeout_message(function.timeout),
                           timed_out=True, duration=duration)  # the watchdog has answered already
        if error is not None:
            error_type, message, trace = describe_error(error)
            return Outcome(error_type=error_type, error_message=message, trace=trace, duration=duration)
        return Outcome(value=value, duration=duration)

    def _give_back(self, runner: _Runner) -> None:
        with self._lock:
            self._idle.append(runner)

    def invoke(self, function: Function, event: dict[str, Any], request_id: str,
               answer_early: Callable[[], None] | None = None) -> Outcome:
        """Run the handler within its time limit. With `answer_early` (a way to send the 502 from
        another thread) it runs inline under the watchdog; else on a runner thread."""
        if answer_early is not None:
            return self._invoke_inline(function, event, request_id, answer_early)
        started = time.monotonic()
        context = LambdaContext(function.name, request_id, function.timeout, started=started)
        runner = self._take()
        slot = _Slot()
        runner.inbox.put((lambda: call_handler(function, event, context, runner.loop_runner), slot))
        if not slot.done.acquire(timeout=function.timeout):
            log.error("function %s (request %s) timed out after %.2f s; its thread is abandoned",
                      function.name, request_id, function.timeout)
            if self._on_stuck is not None:
                self._on_stuck(function)
            return Outcome(error_type="TimeoutError", error_message=timeout_message(function.timeout),
                           timed_out=True, duration=time.monotonic() - started)
        self._give_back(runner)
        duration = time.monotonic() - started
        if slot.error is not None:
            error_type, message, trace = describe_error(slot.error)
            return Outcome(error_type=error_type, error_message=message, trace=trace, duration=duration)
        return Outcome(value=slot.value, duration=duration)
