"""The web processes' gunicorn worker class: gthread with fewer thread hand-offs.

gunicorn's gthread hands every request over twice: its main thread sees the connection readable and
submits it to the thread pool; after the answer the pool thread has the main thread told (a pipe write
and a wake-up) to put the connection back in its poller. On this 2-core VM a wake-up of another
thread costs more than bgfn's own work for a small call (README, "Benchmarks"). So
:class:`LingeringWorker` changes two things, and leaves the rest (accepting, idle kept-alive
connections and their timeout, graceful stop, TLS, HTTP/2) to gthread:

- after an answer on a kept-alive connection the pool thread waits up to BGFN_WEB_LINGER (2 ms by
  default) for the connection's next request and serves it itself. It does so only while the process
  has no more connections than threads and another thread is free; and when the main thread queues a
  connection while every thread is busy, a lingering thread gives its own back at once and takes that
  one. So lingering never keeps a waiting connection from being served;
- a connection that stays open is put back in the poller by the pool thread itself (the poller and
  the deque of kept-alive connections are safe to add to from another thread). Everything else that
  ends a request (closing, a request read ahead, a stopping worker) still goes to gthread's own
  `finish_request` on the main thread.

Measured (bench/, README "Benchmarks"), a trivial sync call: at 1 connection the linger cuts its CPU
by ~35 % and its p50 from ~0.7 to ~0.35 ms; at 16 connections putting connections back from the pool
thread gives ~14 % more requests/s; at 64 both measure as gthread does.
"""

from __future__ import annotations

import os
import select
import selectors
import threading
from concurrent import futures
from contextlib import suppress
from functools import partial
from typing import Any

from gunicorn.config import Config
from gunicorn.workers.gthread import ThreadWorker

from bgfn import defaults


class SettledConfig(Config):
    """gunicorn's Config, each setting looked up once. `Config.__getattr__` finds a setting's
    object and asks it for its value on every read, and gunicorn reads settings a few dozen times
    per request (~5 % of a small request's CPU, py-spy). A worker's settings do not change once it
    runs (a reload forks new workers), and `set` forgets the value it replaces all the same."""

    def __getattr__(self, name: str) -> Any:
        value = super().__getattr__(name)
        self.__dict__[name] = value
        return value

    def set(self, name: str, value: Any) -> None:
        self.__dict__.pop(name, None)
        super().set(name, value)


class LingeringWorker(ThreadWorker):
    """gthread, with each pool thread serving its connection's next request when it comes quickly."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._busy = 0  # pool threads inside handle(), lingering ones included
        self._lingering = 0
        self._count_lock = threading.Lock()
        self._wake_read = self._wake_write = -1
        # bgfn.server's application gives BGFN_WEB_LINGER; another (the benchmark's baselines) gets the default
        self.linger = float(getattr(self.app, "web_linger", defaults.WEB_LINGER))

    def init_process(self) -> None:
        # Written to by the main thread when it queues a connection while every pool thread is busy:
        # a lingering thread then gives its own connection back and takes the queued one.
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self.cfg.__class__ = SettledConfig  # this process's own copy (forked from the arbiter's)
        super().init_process()

    def enqueue_req(self, conn: Any) -> None:
        self.tpool.submit(self._serve, conn)  # no completion callback: _serve reports to the main thread
        if self._lingering and self._busy >= self.cfg.threads:
            with suppress(BlockingIOError):
                os.write(self._wake_write, b"\0")

    def handle(self, conn: Any) -> Any:
        self._count(busy=1)
        try:
            result = super().handle(conn)
            while result is True and self._may_linger(conn) and self._next_request_comes(conn):
                result = super().handle(conn)
            return result
        finally:
            self._count(busy=-1)

    def _serve(self, conn: Any) -> None:
        """Serve the connection (lingering, see handle), then put it back in gunicorn's poller
        ourselves when it stays open: gthread has the main thread told (a pipe write and a wake-up)
        to do that. Every other outcome goes to gthread's own `finish_request` on the main thread,
        as gthread does it (closing, a request already read ahead, a stopping worker)."""
        done: futures.Future[Any] = futures.Future()
        try:
            result = self.handle(conn)
        except BaseException as exc:
            done.set_exception(exc)
        else:
            if result is True and self.alive and not conn.parser.unreader.buf.getvalue():
                # As finish_request does it; the deque first, so the poller never reports a
                # connection that on_client_socket_readable cannot find there.
                try:
                    conn.sock.setblocking(False)
                    conn.set_timeout()
                    self.keepalived_conns.append(conn)
                    self.poller.register(conn.sock, selectors.EVENT_READ,
                                         partial(self.on_client_socket_readable, conn))
                    return
                except (OSError, ValueError, KeyError):  # closed meanwhile (a stopping worker): close it
                    with suppress(ValueError):
                        self.keepalived_conns.remove(conn)
                    result = False
            done.set_result(result)
        self.method_queue.defer(self.finish_request, conn, done)

    def _count(self, busy: int = 0, lingering: int = 0) -> None:
        with self._count_lock:
            self._busy += busy
            self._lingering += lingering

    def _may_linger(self, conn: Any) -> bool:
        """Linger only on a plain HTTP/1 connection of a running worker, while the process has no more
        connections than threads (so each can have one) and a thread is free."""
        threads = self.cfg.threads
        return bool(self.linger > 0 and self.alive and self.nr_conns <= threads and self._busy < threads
                    and not conn.is_http2 and not self.cfg.is_ssl)

    def _next_request_comes(self, conn: Any) -> bool:
        """Whether the connection's next request arrived within the linger (and nothing else waits)."""
        if conn.parser.unreader.buf.getvalue():  # already read (a pipelined request)
            return True
        poller = select.poll()
        poller.register(conn.sock, select.POLLIN)
        poller.register(self._wake_read, select.POLLIN)
        self._count(lingering=1)
        try:
            ready = {fd for fd, _ in poller.poll(self.linger * 1000)}
        finally:
            self._count(lingering=-1)
        if self._wake_read in ready:
            with suppress(BlockingIOError):
                os.read(self._wake_read, 64)
            return False
        return bool(ready)
