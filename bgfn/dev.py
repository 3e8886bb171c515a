"""`bgfn dev`: web + worker (+ an embedded Redis when REDIS_URL is not set), restarted on change."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import click

from bgfn import defaults
from bgfn.config import SiteConfig
from bgfn.redis_server import RedisServer
from bgfn.settings import Settings


def _watched_files(site: SiteConfig) -> Iterator[Path]:
    if site.config_file is not None:
        yield site.config_file
    bgfn_file = site.site_dir / defaults.BGFN_CONFIG_FILE
    if bgfn_file.exists():
        yield bgfn_file
    if site.functions_dir is not None:
        yield from site.functions_dir.rglob("*.py")


def snapshot(site: SiteConfig) -> dict[Path, float]:
    """Modification times of every file whose change should reload the functions."""
    stamps: dict[Path, float] = {}
    for path in _watched_files(site):
        try:
            stamps[path] = path.stat().st_mtime
        except OSError:
            continue
    return stamps


class DevSupervisor:
    """Runs `bgfn serve`, `bgfn worker` and `bgfn scheduler` as child processes, restarted when files change."""

    def __init__(self, settings: Settings, site: SiteConfig) -> None:
        self.settings = settings
        self.site = site
        self.children: list[subprocess.Popen[bytes]] = []
        self.redis: RedisServer | None = None
        self.stopping = False

    def _start_children(self, env: dict[str, str]) -> None:
        base = [sys.executable, "-m", "bgfn", "--site", str(self.site.site_dir)]
        self.children = [subprocess.Popen([*base, "serve"], env=env),
                         subprocess.Popen([*base, "worker"], env=env),
                         subprocess.Popen([*base, "scheduler"], env=env)]

    def _stop_children(self) -> None:
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for child in self.children:
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        self.children = []

    def run(self) -> None:
        settings = self.settings.replace(dev=True)
        if not settings.redis_url:
            self.redis = RedisServer(self.site.site_dir / defaults.DEV_DATA_DIR / "redis", own_session=True)
            settings = settings.replace(redis_url=self.redis.start())
            click.echo(f"bgfn dev: embedded Redis at {settings.redis_url} (data in {self.redis.data_dir})")
        env = {**os.environ, **settings.as_environ()}
        signal.signal(signal.SIGTERM, lambda *_: self._request_stop())
        # A closed terminal: stop in order too (the embedded Redis has its own session and gets no SIGHUP)
        signal.signal(signal.SIGHUP, lambda *_: self._request_stop())
        click.echo(f"bgfn dev: serving {self.site.site_dir} at http://{settings.bind}/.netlify/functions/NAME")
        try:
            self._start_children(env)
            stamps = snapshot(self.site)
            while not self.stopping:
                time.sleep(defaults.RELOAD_POLL_INTERVAL)
                current = snapshot(self.site)
                if current != stamps:
                    stamps = current
                    click.echo("bgfn dev: files changed, reloading functions")
                    self._stop_children()
                    self._start_children(env)
        except KeyboardInterrupt:
            pass
        finally:
            self._stop_children()
            if self.redis is not None:
                self.redis.stop()

    def _request_stop(self) -> None:
        self.stopping = True
