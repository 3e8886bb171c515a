"""Helpers shared by the tests: polling with a deadline, HTTP calls, sites on disk, processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.client import HTTPConnection
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent


def wait_for(predicate: Callable[[], T], timeout: float = 15.0, interval: float = 0.02, what: str = "") -> T:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)


@dataclass
class HttpResult:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


def http(base: str, method: str, path: str, body: bytes | None = None,
         headers: list[tuple[str, str]] | None = None, timeout: float = 30.0) -> HttpResult:
    """One HTTP request to `base` (http://HOST:PORT) with headers sent exactly as given."""
    host = base.split("://", 1)[1]
    conn = HTTPConnection(host, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers or []:
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        data = response.read()
        return HttpResult(response.status, list(response.getheaders()), data)
    finally:
        conn.close()


def answers_health(base: str) -> bool:
    """Whether a bgfn server at `base` answers its health check (False while it is not listening)."""
    try:
        return http(base, "GET", "/.bgfn/health", timeout=2).status == 200
    except OSError:
        return False


def write_site(root: Path, files: dict[str, str], netlify_toml: str | None = '[functions]\ndirectory = "functions"\n'
               ) -> Path:
    """Write a site: `files` maps paths (relative to the site) to source text (dedented)."""
    root.mkdir(parents=True, exist_ok=True)
    if netlify_toml is not None:
        (root / "netlify.toml").write_text(textwrap.dedent(netlify_toml))
    (root / "functions").mkdir(exist_ok=True)
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def bgfn_env(**extra: str) -> dict[str, str]:
    """The environment for a bgfn child process: this one minus bgfn's settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BGFN_") and k != "REDIS_URL"}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def bgfn_command(site: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "bgfn", "--site", str(site), *args]


class Process:
    """A child process whose output goes to a file, stopped (and reaped) by `stop()`."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(args, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, cwd=ROOT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.popen.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        if self.alive():
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.popen.wait()
        else:
            try:  # leave no orphans behind (gunicorn workers, RQ work horses)
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._log.close()
        return self.popen.returncode


def describe(value: Any) -> str:
    return repr(value)[:500]
