"""The invoke path: run a handler with a time limit, in-process.

Handlers run on runner threads so the calling thread can stop waiting at the time limit and
answer 502. A runner whose handler overran is abandoned (Python cannot stop a thread), and the
`on_stuck` callback lets the host recycle the process: under gunicorn the worker finishes its
requests and is replaced, and gunicorn's own timeout kills it if the handler holds the GIL.
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


class Invoker:
    """Runs handlers with time limits on a pool of runner threads (created per process, lazily)."""

    def __init__(self, on_stuck: Callable[[Function], None] | None = None) -> None:
        self._on_stuck = on_stuck
        self._idle: list[_Runner] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def _take(self) -> _Runner:
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's threads do not exist here
                self._idle, self._pid = [], os.getpid()
            return self._idle.pop() if self._idle else _Runner()

    def _give_back(self, runner: _Runner) -> None:
        with self._lock:
            self._idle.append(runner)

    def invoke(self, function: Function, event: dict[str, Any], request_id: str) -> Outcome:
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
