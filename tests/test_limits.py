"""Backpressure, end to end: a burst against the queue cap, per-function caps, sync concurrency."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis
from flask.testing import FlaskClient

from tests.conftest import run_worker_burst
from tests.helpers import http, wait_for

SITE = {
    "functions/mark-background.py": """
        import os, pathlib
        def handler(event, context):
            pathlib.Path(os.environ["MARK_DIR"], context.aws_request_id).write_text("ran")
    """,
    "functions/capped-background.py": """
        config = {"max_queued": 2}
        def handler(event, context):
            return None
    """,
    "functions/gate.py": """
        import os, pathlib, time
        config = {"sync_concurrency": 1}
        def handler(event, context):
            gate = pathlib.Path(os.environ["MARK_DIR"], "open")
            pathlib.Path(os.environ["MARK_DIR"], "entered").write_text("x")
            deadline = time.monotonic() + 20
            while not gate.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            return {"statusCode": 200, "body": "through"}
    """,
}


def test_a_burst_stops_at_the_cap_and_every_202_runs(make_site: Callable[..., Path],
                                                      make_client: Callable[..., FlaskClient],
                                                      redis_client: redis.Redis, redis_url: str,
                                                      marks: Path) -> None:
    site = make_site(SITE)
    client = make_client(site, max_queued=10)
    answers = [client.post("/.netlify/functions/mark-background") for _ in range(40)]
    accepted = [a.headers["X-Bgfn-Job-Id"] for a in answers if a.status_code == 202]
    refused = [a for a in answers if a.status_code != 202]
    assert len(accepted) == 10
    assert len(refused) == 30 and {a.status_code for a in refused} == {429}
    body = json.loads(refused[0].data)
    assert body["errorType"] == "QueueFull"
    assert "BGFN_MAX_QUEUED is 10" in body["errorMessage"] and "not stored" in body["errorMessage"]
    assert 1 <= int(refused[0].headers["Retry-After"]) <= 3600
    assert redis_client.llen("rq:queue:bgfn") == 10
    assert len(list(redis_client.scan_iter("rq:job:*"))) == 10  # nothing half-stored: Redis holds only the 202s

    run_worker_burst(site, redis_url, MARK_DIR=str(marks))
    assert sorted(p.name for p in marks.iterdir()) == sorted(accepted)
    assert int(redis_client.hget("bgfn:waiting", "mark-background") or 0) == 0
    # Drained: calls are accepted again.
    assert client.post("/.netlify/functions/mark-background").status_code == 202


def test_a_function_cap_refuses_only_that_function(make_site: Callable[..., Path],
                                                   make_client: Callable[..., FlaskClient]) -> None:
    client = make_client(make_site(SITE))
    statuses = [client.post("/.netlify/functions/capped-background").status_code for _ in range(4)]
    assert statuses == [202, 202, 429, 429]
    refused = client.post("/.netlify/functions/capped-background")
    assert json.loads(refused.data)["errorType"] == "FunctionQueueFull"
    assert client.post("/.netlify/functions/mark-background").status_code == 202


def test_the_age_cap_refuses_when_the_oldest_job_waited_too_long(make_site: Callable[..., Path],
                                                                 make_client: Callable[..., FlaskClient]) -> None:
    client = make_client(make_site(SITE), max_queue_age=1)
    assert client.post("/.netlify/functions/mark-background").status_code == 202
    refused = wait_for(lambda: (r := client.post("/.netlify/functions/mark-background")).status_code == 429 and r,
                       timeout=10, interval=0.2, what="the age cap to refuse")
    assert json.loads(refused.data)["errorType"] == "QueueTooOld"


def test_sync_concurrency_answers_the_excess_429(make_site: Callable[..., Path],
                                                 start_server: Callable[..., str], marks: Path) -> None:
    base = start_server(make_site(SITE), "--workers", "1", "--threads", "4", MARK_DIR=str(marks))
    first: dict[str, int] = {}
    thread = threading.Thread(target=lambda: first.update(status=http(base, "GET", "/.netlify/functions/gate").status))
    thread.start()
    wait_for(lambda: (marks / "entered").exists(), what="the first call to enter the handler")
    second = http(base, "GET", "/.netlify/functions/gate")
    assert second.status == 429 and second.header("Retry-After") == "1"
    assert json.loads(second.body)["errorType"] == "TooManyRequests"
    (marks / "open").touch()
    thread.join(20)
    assert first == {"status": 200}
    assert http(base, "GET", "/.netlify/functions/gate").status == 200


CONCURRENCY_SITE = {
    "functions/busy-background.py": """
        import os, pathlib, time
        config = {"concurrency": 1}
        def handler(event, context):
            start = time.time()
            time.sleep(0.6)
            pathlib.Path(os.environ["MARK_DIR"], "busy-" + context.aws_request_id).write_text(
                f"{start} {time.time()}")
    """,
    "functions/quiet-background.py": """
        import os, pathlib, time
        def handler(event, context):
            pathlib.Path(os.environ["MARK_DIR"], "quiet").write_text(str(time.time()))
    """,
}


def test_concurrency_keeps_a_flooded_function_from_starving_a_quiet_one(
        make_site: Callable[..., Path], make_client: Callable[..., FlaskClient], start_worker: Callable[..., object],
        marks: Path) -> None:
    site = make_site(CONCURRENCY_SITE)
    client = make_client(site)
    for _ in range(4):
        assert client.post("/.netlify/functions/busy-background").status_code == 202
    quiet_sent = time.time()
    assert client.post("/.netlify/functions/quiet-background").status_code == 202
    start_worker(site, MARK_DIR=str(marks))
    start_worker(site, MARK_DIR=str(marks))

    wait_for(lambda: (marks / "quiet").exists(), timeout=20, what="the quiet job")
    busy_done = [p for p in marks.iterdir() if p.name.startswith("busy-")]
    assert len(busy_done) < 4, "the quiet job waited behind the whole flood"
    assert float((marks / "quiet").read_text()) - quiet_sent < 10

    wait_for(lambda: len([p for p in marks.iterdir() if p.name.startswith("busy-")]) == 4, timeout=30,
             what="the flood to finish")
    spans = sorted(tuple(map(float, p.read_text().split())) for p in marks.iterdir() if p.name.startswith("busy-"))
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert start >= end - 0.01, f"two runs of a concurrency = 1 function overlapped: {spans}"
