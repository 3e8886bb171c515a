"""Metrics and log lines, scraped from a real `bgfn serve` (two gunicorn processes) and a real
`bgfn worker` after known traffic."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import Process, http, wait_for

TOKEN = "metrics-token-0123456789"
SITE = {
    "functions/hello.py": """
        def handler(event, context):
            return {"statusCode": 200, "body": "hi"}
    """,
    "functions/boom.py": """
        def handler(event, context):
            raise RuntimeError("boom")
    """,
    "functions/ok-background.py": """
        def handler(event, context):
            print("ran", context.aws_request_id)
    """,
    "functions/flaky-background.py": """
        config = {"retry_delays": [0], "max_attempts": 2}
        def handler(event, context):
            raise ValueError("always")
    """,
}


def scrape(base: str, token: str | None = TOKEN) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    headers = [("Authorization", f"Bearer {token}")] if token else []
    answer = http(base, "GET", "/.bgfn/metrics", headers=headers)
    assert answer.status == 200, answer.text
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_known_traffic_across_processes(make_site: Callable[..., Path],
                                                       start_server: Callable[..., str],
                                                       start_worker: Callable[..., Process]) -> None:
    site = make_site(SITE)
    base = start_server(site, "--workers", "2", BGFN_ADMIN_TOKEN=TOKEN)
    assert http(base, "GET", "/.bgfn/metrics").status == 401
    assert http(base, "GET", "/.bgfn/metrics", headers=[("Authorization", "Bearer wrong-token-xxxx")]).status == 401

    for _ in range(7):
        assert http(base, "GET", "/.netlify/functions/hello").status == 200
    for _ in range(3):
        assert http(base, "GET", "/.netlify/functions/boom").status == 502
    ok_ids = [http(base, "POST", "/.netlify/functions/ok-background").header("X-Bgfn-Job-Id") for _ in range(4)]
    assert all(ok_ids)
    assert http(base, "POST", "/.netlify/functions/flaky-background").status == 202
    assert http(base, "POST", "/.netlify/functions/ok-background", body=b"x" * (300 * 1024)).status == 413

    before = scrape(base)
    assert value(before, "bgfn_queue_depth", queue="bgfn") == 5  # no worker yet: all five wait

    start_worker(site)
    wait_for(lambda: value(scrape(base), "bgfn_jobs_failed_total", function="flaky-background") == 1,
             timeout=30, what="the flaky job to fail for good")
    wait_for(lambda: value(scrape(base), "bgfn_jobs_succeeded_total", function="ok-background") == 4,
             timeout=30, what="the four jobs to succeed")
    samples = scrape(base)
    # Web counters add up over both gunicorn processes (multiprocess mode).
    assert value(samples, "bgfn_invocations_total", function="hello", kind="sync", status="200") == 7
    assert value(samples, "bgfn_invocations_total", function="boom", kind="sync", status="502") == 3
    assert value(samples, "bgfn_invocations_total", function="ok-background", kind="background", status="202") == 4
    assert value(samples, "bgfn_background_accepted_total", function="ok-background") == 4
    assert value(samples, "bgfn_background_refused_total", function="ok-background", reason="too_large") == 1
    assert value(samples, "bgfn_sync_duration_seconds_count", function="hello") == 7
    # Job figures come from the worker through Redis.
    assert value(samples, "bgfn_jobs_retried_total", function="flaky-background") == 1
    assert value(samples, "bgfn_jobs_failed_total", function="ok-background") == 0
    assert value(samples, "bgfn_job_wait_seconds_count", function="ok-background") == 4
    assert value(samples, "bgfn_job_run_seconds_count", function="ok-background") == 4
    assert value(samples, "bgfn_job_run_seconds_count", function="flaky-background") == 2
    assert value(samples, "bgfn_job_wait_seconds_bucket", function="ok-background", le="+Inf") == 4
    assert value(samples, "bgfn_queue_depth", queue="bgfn") == 0


def test_metrics_are_off_without_an_admin_token(make_site: Callable[..., Path],
                                                start_server: Callable[..., str]) -> None:
    base = start_server(make_site(SITE))
    answer = http(base, "GET", "/.bgfn/metrics")
    assert answer.status == 404
    assert "BGFN_ADMIN_TOKEN" in json.loads(answer.body)["errorMessage"]


def test_json_log_lines_link_the_invocation_to_its_job(make_site: Callable[..., Path],
                                                       start_server: Callable[..., str],
                                                       start_worker: Callable[..., Process],
                                                       processes: list[Process]) -> None:
    site = make_site(SITE)
    base = start_server(site, BGFN_LOG_FORMAT="json")
    worker = start_worker(site, BGFN_LOG_FORMAT="json")
    job_id = http(base, "POST", "/.netlify/functions/ok-background").header("X-Bgfn-Job-Id")
    assert http(base, "GET", "/.netlify/functions/hello").status == 200

    def lines(process: Process) -> list[dict[str, object]]:
        return [json.loads(line) for line in process.output().splitlines() if line.startswith("{")]

    server = processes[0]
    accepted = wait_for(lambda: [r for r in lines(server) if r.get("event") == "invocation"
                                 and r.get("request_id") == job_id], what="the web's line for the 202")
    assert accepted[0]["status"] == 202 and accepted[0]["function"] == "ok-background"
    assert isinstance(accepted[0]["duration_ms"], float)
    done = wait_for(lambda: [r for r in lines(worker) if r.get("event") == "job_succeeded"
                             and r.get("job_id") == job_id], timeout=20, what="the worker's line for the job")
    assert done[0]["function"] == "ok-background" and done[0]["attempt"] == 1
    sync = [r for r in lines(server) if r.get("event") == "invocation" and r.get("function") == "hello"]
    assert sync and sync[0]["status"] == 200 and re.fullmatch(r"[0-9a-f-]{36}", str(sync[0]["request_id"]))


def test_log_times_match_loggings_own_formatting_across_seconds() -> None:
    """bgfn's formatters format each second once (bgfn.logs): the text must still be what logging's
    default formatter gives, and a new second must show as such."""
    import logging

    from bgfn.logs import JsonFormatter, TextFormatter

    text, json_lines, reference = TextFormatter(), JsonFormatter(), logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s")
    for created in (1795935600.25, 1795935600.999, 1795935601.0, 1795935601.5, 1795935599.75):
        record = logging.LogRecord("bgfn.app", logging.INFO, "", 0, "invocation %s", ("x",), None)
        record.created, record.msecs = created, (created - int(created)) * 1000
        assert text.format(record) == reference.format(record)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(record.msecs):03d}Z"
        assert json.loads(json_lines.format(record))["time"] == stamp
