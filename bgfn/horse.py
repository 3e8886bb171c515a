"""The work horse: one child of a worker that runs its jobs one after another.

RQ's worker forks a work horse per job, which costs about as much as a trivial job's whole run
(a fork, then the horse's own exit). bgfn's worker (bgfn.worker.BgfnWorker) forks one horse and
hands it job after job through a pipe. The division of labour is RQ's: the worker process
dequeues, prepares the execution, heartbeats the running job and watches the clock; the horse runs
RQ's `perform_job` (status, result, retries, callbacks) exactly as a forked horse would.

The worker kills the horse, and forks a fresh one for the next job, when

- a job runs HORSE_KILL_GRACE seconds past its time limit: the horse's own alarm (SIGALRM, repeated
  every ALARM_REPEAT seconds: :class:`RepeatingAlarm`) stops a handler running Python code at the
  limit, but not one stuck in a C call or with signals blocked; only a kill from another process does;
- a running job is canceled, or a stopping worker hands its job back to the queue;
- the horse has run BGFN_HORSE_MAX_JOBS jobs, so a leaking handler cannot grow without bound.

A horse that crashes (a segfault, `os._exit` in a handler) fails its job the way RQ fails a job
whose horse died, and the next job gets a fresh horse. A horse dies with its worker (Linux
PR_SET_PDEATHSIG), so a killed worker leaves no job running unseen.

What persists between the jobs of one horse is what persists in a warm Lambda container: the
functions' module-level state. Each job still gets its own event, context, alarm and log capture.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import random
import select
import signal
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from rq.executions import Execution
from rq.timeouts import UnixSignalDeathPenalty

from bgfn import defaults

if TYPE_CHECKING:
    from bgfn.worker import BgfnWorker

DONE = b"done\n"
_PR_SET_PDEATHSIG = 1


@dataclass
class Horse:
    """The worker's handle on its horse: its pid, the pipe it reads orders from and the pipe it
    reports on."""

    pid: int
    orders: int
    reports: int
    jobs: int = 0

    def send(self, job_id: str, queue: str, execution: str, timeout: float | None) -> bool:
        """Give the horse a job; False when the horse is gone."""
        order = json.dumps({"job": job_id, "queue": queue, "execution": execution, "timeout": timeout})
        try:
            os.write(self.orders, order.encode() + b"\n")  # well under PIPE_BUF: written whole
        except BrokenPipeError:
            return False
        return True

    def wait(self, seconds: float) -> bool | None:
        """Wait up to `seconds` for the running job: True when it finished, False when the horse
        exited instead, None when it is still running."""
        ready, _, _ = select.select([self.reports], [], [], max(0.0, seconds))
        if not ready:
            return None
        return os.read(self.reports, len(DONE)) == DONE

    def close(self) -> None:
        for fd in (self.orders, self.reports):
            try:
                os.close(fd)
            except OSError:
                pass


class RepeatingAlarm(UnixSignalDeathPenalty):
    """RQ's time limit in the horse (SIGALRM raising JobTimeoutException), repeated every
    ALARM_REPEAT seconds until the job stops: RQ's fires once, and a handler that catches
    `Exception` around its work swallows it and runs on until the worker's kill."""

    def setup_death_penalty(self) -> None:
        if self._timeout is None or self._timeout <= 0:
            return
        signal.signal(signal.SIGALRM, self.handle_death_penalty)
        signal.setitimer(signal.ITIMER_REAL, float(self._timeout), defaults.ALARM_REPEAT)

    def cancel_death_penalty(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)


def spawn(worker: BgfnWorker) -> Horse:
    """Fork a horse for `worker`; it waits for orders."""
    orders_out, orders_in = os.pipe()
    reports_out, reports_in = os.pipe()
    pid = os.fork()
    if pid == 0:  # the horse
        try:
            os.close(orders_in)
            os.close(reports_out)
            _serve(worker, orders_out, reports_in)
        finally:
            os._exit(1)
    os.close(orders_out)
    os.close(reports_in)
    return Horse(pid=pid, orders=orders_in, reports=reports_out)


def retire(horse: Horse) -> None:
    """End an idle horse (it holds no job, so nothing is lost) and reap it."""
    horse.close()
    try:
        os.kill(horse.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        os.waitpid(horse.pid, 0)
    except ChildProcessError:
        pass


def _die_with_parent(parent: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the horse ends at its next order instead
        pass
    if os.getppid() != parent:  # the worker died before the request took effect
        os._exit(1)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def _serve(worker: BgfnWorker, orders: int, reports: int) -> NoReturn:
    """The horse's life: take an order, run the job with RQ's `perform_job`, report, repeat; exit
    when the worker closes the pipe (or dies)."""
    parent = os.getppid()
    os.setpgrp()  # the worker kills the horse's whole group, as RQ does
    random.seed()
    worker.setup_work_horse_signals()
    worker._is_horse = True
    worker.log = logging.getLogger("rq.worker")  # as RQ's horse logs
    _die_with_parent(parent)
    queues = {queue.name: queue for queue in worker.queues}
    with open(orders, "rb") as stream:
        for line in stream:
            order: dict[str, Any] = json.loads(line)
            try:
                job = worker.job_class.fetch(order["job"], connection=worker.connection,
                                             serializer=worker.serializer)
                job.timeout = order["timeout"]
                execution = Execution(order["execution"], job.id, worker.connection, worker_name=worker.name)
                execution._job = job
                worker.executions.clear()
                worker.executions[execution.id] = execution
                os.environ["RQ_JOB_ID"] = job.id
                worker.perform_job(job, queues[order["queue"]], execution)
            except BaseException:  # noqa: BLE001 - RQ's own bookkeeping failed (Redis gone): as a forked
                _flush()           # horse would, exit non-zero and let the worker fail the job
                os._exit(1)
            _flush()
            os.write(reports, DONE)
    _flush()
    os._exit(0)
