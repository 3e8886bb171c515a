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


def _pre_request(worker: Any, req: Any) -> None:
    request_local.headers = req.headers
    request_local.worker = worker


def _recycle_worker(function: Function) -> None:
    worker = getattr(request_local, "worker", None)
    if worker is not None and worker.alive:
        log.warning("recycling web worker %s after %s overran its time limit", worker.pid, function.name)
        worker.alive = False


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
        "worker_class": "gthread",
        "timeout": int(longest + defaults.HARD_KILL_GRACE),
        "graceful_timeout": int(longest + defaults.HARD_KILL_GRACE),
        "preload_app": True,
        "pre_request": _pre_request,
        "child_exit": _child_exit,
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

    def load_config(self) -> None:
        for key, value in gunicorn_options(self.settings, self.registry).items():
            if value is not None and key in self.cfg.settings:
                self.cfg.set(key, value)

    def load(self) -> Flask:
        connection = connect(self.settings.redis_url) if self.settings.redis_url else None
        return create_app(self.settings, self.registry, connection, on_stuck=_recycle_worker, rewrites=self.rewrites)
