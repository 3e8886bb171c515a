"""`bgfn serve`: gunicorn running the app.

Functions are imported once, in the gunicorn master, before the workers fork (so an import error
stops start-up); each worker process then shares those modules. A handler that overran its time
limit gets the worker recycled after its answer (see :mod:`bgfn.invoke`).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import threading
import time
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication

from bgfn import defaults
from bgfn.app import create_app, request_local
from bgfn.discovery import Function, Registry
from bgfn.queue import connect
from bgfn.redirects import Rewrite
from bgfn.settings import Settings

log = logging.getLogger("bgfn.server")


_worker: Any = None
"""This process's gunicorn worker (set by its first request)."""
_abandoned = 0
"""Handler threads of this process that overran their limit and may never return."""


def _pre_request(worker: Any, req: Any) -> None:
    global _worker
    request_local.headers = req.headers
    _worker = worker


def _recycle_worker(function: Function) -> None:
    """A handler overran its time limit (called from bgfn.invoke's watchdog or the request thread):
    let this worker finish its other requests and be replaced."""
    global _abandoned
    _abandoned += 1
    worker = _worker
    if worker is not None and worker.alive:
        log.warning("recycling web worker %s after %s overran its time limit", worker.pid, function.name)
        worker.alive = False
        threading.Thread(target=_exit_when_idle, args=(worker,), name="bgfn-recycle", daemon=True).start()


def _exit_when_idle(worker: Any) -> None:
    """End a recycled worker once its requests other than the stuck ones are answered (gunicorn would
    wait for the stuck ones too, up to its graceful timeout, serving nothing meanwhile)."""
    wake = getattr(getattr(worker, "method_queue", None), "defer", None)
    if wake is not None:
        wake(lambda: None)  # as gunicorn's own SIGTERM handler: the loop sees `alive` now, not in 1 s
    deadline = time.monotonic() + float(worker.cfg.graceful_timeout)
    while time.monotonic() < deadline:
        # gthread's loop must have stopped accepting, so no connection is taken after this; then every
        # connection but the stuck ones must be done (kept-alive ones are closed by gthread shortly).
        if not getattr(worker, "_accepting", False) and getattr(worker, "nr_conns", 0) <= _abandoned:
            break
        time.sleep(0.05)
    log.warning("web worker %s exits, leaving %d stuck handler thread(s) behind", worker.pid, _abandoned)
    logging.shutdown()
    os._exit(0)


def _worker_exit(server: Any, worker: Any) -> None:
    """A worker with an abandoned handler thread would wait for it forever at interpreter exit
    (gunicorn's request threads are joined): end the process here instead."""
    if _abandoned:
        logging.shutdown()
        os._exit(0)


def _child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def _remove_if_owner(path: str, owner: int) -> None:
    if os.getpid() == owner:  # gunicorn workers inherit atexit handlers: only the master removes it
        shutil.rmtree(path, ignore_errors=True)


def prepare_metrics_dir() -> str:
    """Give prometheus-client a fresh folder for the counters of every gunicorn process.

    Must run before anything imports prometheus_client (bgfn.metrics is imported by create_app).
    An operator's PROMETHEUS_MULTIPROC_DIR is used (and emptied); else a temporary folder.
    """
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(path):
            if name.endswith(".db"):
                os.unlink(os.path.join(path, name))
    else:
        path = tempfile.mkdtemp(prefix="bgfn-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
        atexit.register(_remove_if_owner, path, os.getpid())
    return path


def gunicorn_options(settings: Settings, registry: Registry) -> dict[str, Any]:
    longest = max([f.timeout for f in registry if not f.background] or [settings.sync_timeout])
    return {
        "bind": [settings.bind],
        "workers": settings.web_workers,
        "threads": settings.web_threads,
        "worker_class": "bgfn.webworker.LingeringWorker",
        "timeout": int(longest + defaults.HARD_KILL_GRACE),
        "graceful_timeout": int(longest + defaults.HARD_KILL_GRACE),
        "preload_app": True,
        "pre_request": _pre_request,
        "child_exit": _child_exit,
        "worker_exit": _worker_exit,
        "loglevel": settings.log_level.lower(),
        "accesslog": "-" if settings.dev else None,
        "proc_name": "bgfn-web",
        "control_socket_disable": True,  # gunicorn >= 27: no shared socket in $HOME for several servers
    }


class GunicornServer(BaseApplication):
    """gunicorn configured from bgfn's settings, serving an already-loaded registry."""

    def __init__(self, settings: Settings, registry: Registry, rewrites: list[Rewrite] | None = None) -> None:
        prepare_metrics_dir()
        self.settings = settings
        self.registry = registry
        self.rewrites = rewrites or []
        super().__init__()

    @property
    def web_linger(self) -> float:
        """Read by bgfn.webworker's worker class (gunicorn gives each worker its application)."""
        return self.settings.web_linger

    def load_config(self) -> None:
        for key, value in gunicorn_options(self.settings, self.registry).items():
            if value is not None and key in self.cfg.settings:
                self.cfg.set(key, value)

    def load(self) -> Flask:
        connection = connect(self.settings.redis_url) if self.settings.redis_url else None
        return create_app(self.settings, self.registry, connection, on_stuck=_recycle_worker, rewrites=self.rewrites)
