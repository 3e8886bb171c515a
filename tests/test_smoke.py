"""End to end as a user runs it: `bgfn serve` and `bgfn worker` as real processes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from tests.helpers import Process, http, wait_for

SITE = {
    "functions/hello.py": """
        def handler(event, context):
            return {"statusCode": 200, "body": "hi " + event["httpMethod"]}
    """,
    "functions/mark-background.py": """
        import os, pathlib
        def handler(event, context):
            pathlib.Path(os.environ["MARK_DIR"], context.aws_request_id).write_text(event["body"] or "")
    """,
}


def test_serve_and_worker_processes(make_site: Callable[..., Path], start_server: Callable[..., str],
                                    start_worker: Callable[..., Process], tmp_path: Path) -> None:
    site = make_site(SITE)
    marks = tmp_path / "marks"
    marks.mkdir()
    base = start_server(site)
    start_worker(site, MARK_DIR=str(marks))

    sync = http(base, "GET", "/.netlify/functions/hello")
    assert (sync.status, sync.body) == (200, b"hi GET")

    accepted = http(base, "POST", "/.netlify/functions/mark-background", body=b"payload",
                    headers=[("Content-Type", "text/plain")])
    assert accepted.status == 202
    assert accepted.body == b""
    job_id = accepted.header("X-Bgfn-Job-Id")
    assert job_id
    mark = marks / job_id
    wait_for(mark.exists, timeout=20, what="the background function to run")
    assert mark.read_text() == "payload"

    ready = http(base, "GET", "/.bgfn/ready")
    assert ready.status == 200
    assert json.loads(ready.body)["functions"] == 2
