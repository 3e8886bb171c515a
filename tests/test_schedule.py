"""Scheduled functions (CONTRACT §8): ticks with a controllable clock, exactly once across two
schedulers, the event a worker hands the function, the 404 in production, `bgfn list`."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner
from flask.testing import FlaskClient

from bgfn.cli import main
from bgfn.config import load_site
from bgfn.discovery import load_registry
from bgfn.errors import FunctionLoadError
from bgfn.queue import make_queue
from bgfn.scheduler import Scheduler, next_tick
from bgfn.settings import Settings
from tests.conftest import run_worker_burst
from tests.helpers import Process, bgfn_command, bgfn_env, wait_for

SITE_TOML = """
    [functions]
    directory = "functions"

    [functions."nightly"]
    schedule = "@daily"
"""
SITE = {
    "functions/every-5.py": """
        import json, os, pathlib
        config = {"schedule": "*/5 * * * *"}
        def handler(event, context):
            pathlib.Path(os.environ["MARK_DIR"], context.aws_request_id).write_text(json.dumps(event))
    """,
    "functions/nightly.py": """
        def handler(event, context):
            return {"statusCode": 200, "body": "ran"}
    """,
}


class Clock:
    def __init__(self, start: datetime) -> None:
        self.now = start.timestamp()

    def __call__(self) -> float:
        return self.now


def scheduler_for(site: Path, redis_client: redis.Redis, clock: Clock) -> Scheduler:
    settings = Settings(site=site)
    registry, _ = load_registry(load_site(site), settings)
    return Scheduler(registry, make_queue(redis_client, settings.queue), clock=clock)


def test_each_tick_is_enqueued_once_across_two_schedulers(make_site: Callable[..., Path], redis_client: redis.Redis,
                                                          redis_url: str, marks: Path) -> None:
    site = make_site(SITE, SITE_TOML)
    clock = Clock(datetime(2026, 3, 1, 11, 58, 30, tzinfo=UTC))
    first, second = scheduler_for(site, redis_client, clock), scheduler_for(site, redis_client, clock)
    assert first.run_due() == [] and second.run_due() == []  # nothing due yet
    assert first.seconds_to_next() == 90.0  # 12:00:00

    clock.now = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC).timestamp()
    stored = first.run_due() + second.run_due()
    assert len(stored) == 1  # 12:00 for every-5; nightly is not due
    assert first.run_due() == [] and second.run_due() == []  # the same tick never twice

    clock.now = datetime(2026, 3, 2, 0, 0, 1, tzinfo=UTC).timestamp()  # both stalled past many ticks
    later = second.run_due() + first.run_due()
    assert len(later) == 2  # only the latest tick of each function: every-5 at 00:00 and nightly at 00:00

    run_worker_burst(site, redis_url, MARK_DIR=str(marks))
    [event] = [json.loads(p.read_text()) for p in marks.iterdir() if p.name == stored[0]]
    assert event["httpMethod"] == "POST"
    assert event["headers"]["user-agent"] == "Netlify Clockwork"
    assert event["headers"]["x-nf-event"] == "schedule"
    assert json.loads(event["body"]) == {"next_run": "2026-03-01T12:05:00Z"}


def test_next_tick_follows_cron_and_shortcuts() -> None:
    start = datetime(2026, 3, 1, 11, 58, 30, tzinfo=UTC).timestamp()
    assert datetime.fromtimestamp(next_tick("@hourly", start), UTC) == datetime(2026, 3, 1, 12, tzinfo=UTC)
    assert datetime.fromtimestamp(next_tick("@weekly", start), UTC) == datetime(2026, 3, 8, tzinfo=UTC)
    assert datetime.fromtimestamp(next_tick("30 9 * * 1", start), UTC) == datetime(2026, 3, 2, 9, 30, tzinfo=UTC)


@pytest.mark.parametrize(("schedule", "message"), [
    ("@every-minute", 'schedule = "@every-minute": unknown shortcut; use one of @yearly'),
    ("* * * *", 'schedule = "* * * *": expected five cron fields in UTC'),
    ("61 * * * *", 'schedule = "61 * * * *": expected five cron fields in UTC'),
])
def test_a_bad_schedule_stops_loading_with_the_expression_quoted(make_site: Callable[..., Path], schedule: str,
                                                                 message: str) -> None:
    site = make_site({"functions/tick.py": f"config = {{'schedule': {schedule!r}}}\ndef handler(e, c):\n    pass\n"})
    with pytest.raises(FunctionLoadError) as caught:
        load_registry(load_site(site), Settings(site=site))
    assert message in str(caught.value)


def test_scheduled_functions_are_404_over_http_except_in_development(make_site: Callable[..., Path],
                                                                      make_client: Callable[..., FlaskClient]) -> None:
    site = make_site(SITE, SITE_TOML)
    production = make_client(site).get("/.netlify/functions/nightly")
    assert production.status_code == 404 and production.data == b"Function not found..."
    assert make_client(site, dev=True).get("/.netlify/functions/nightly").data == b"ran"


def test_list_shows_each_schedule_and_its_next_run(make_site: Callable[..., Path]) -> None:
    site = make_site(SITE, SITE_TOML)
    result = CliRunner().invoke(main, ["--site", str(site), "list"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "FILE", "SCHEDULE"]
    nightly = next(line for line in lines if line.startswith("nightly"))
    assert "scheduled" in nightly and "@daily (next " in nightly and "T00:00:00Z)" in nightly


def test_the_scheduler_process_runs_idle_and_stops_on_sigterm(make_site: Callable[..., Path], redis_url: str,
                                                             tmp_path: Path) -> None:
    site = make_site(SITE, SITE_TOML)
    process = Process(bgfn_command(site, "scheduler"), bgfn_env(REDIS_URL=redis_url), tmp_path / "scheduler.log")
    try:
        wait_for(lambda: "scheduled function(s)" in process.output(), timeout=20, what="the scheduler to start")
        assert "every-5 (*/5 * * * *)" in process.output() and "nightly (@daily)" in process.output()
        process.signal(signal.SIGTERM)
        process.popen.wait(10)
        assert process.popen.returncode == 0, process.output()
    finally:
        process.stop()
    done = subprocess.run(bgfn_command(site, "scheduler"), env=bgfn_env(), capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "REDIS_URL is not set" in done.stderr
