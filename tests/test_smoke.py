"""End to end as a user runs it: `bgfn serve` and `bgfn worker` as real processes."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

from bgfn.redis_server import free_port
from tests.helpers import Process, answers_health, bgfn_command, bgfn_env, http, wait_for

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


def test_dev_stops_in_order_on_ctrl_c_with_nothing_left(make_site: Callable[..., Path], tmp_path: Path) -> None:
    """`bgfn dev` with its embedded Redis, stopped as a terminal's Ctrl-C does it: SIGINT to the whole
    process group at once. The embedded Redis is in a session of its own, so it outlives the web,
    worker and scheduler while they stop (no "Redis refused" tracebacks), and is then stopped too."""
    site = make_site(SITE)
    marks = tmp_path / "marks"
    marks.mkdir()
    log = tmp_path / "dev.log"
    base = f"http://127.0.0.1:{free_port()}"
    with log.open("wb") as out:
        dev = subprocess.Popen(bgfn_command(site, "dev", "--bind", base.split("//")[1]),
                               env=bgfn_env(MARK_DIR=str(marks)), stdout=out, stderr=subprocess.STDOUT,
                               start_new_session=True,  # its own group, as a terminal gives a command
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for(lambda: answers_health(base), timeout=60, what="bgfn dev to answer")
        accepted = http(base, "POST", "/.netlify/functions/mark-background", body=b"x")
        assert accepted.status == 202
        wait_for((marks / str(accepted.header("X-Bgfn-Job-Id"))).exists, timeout=20, what="the job to run")
        os.killpg(dev.pid, signal.SIGINT)
        assert dev.wait(timeout=30) is not None
    finally:
        if dev.poll() is None:
            os.killpg(dev.pid, signal.SIGKILL)
            dev.wait()
    output = log.read_text()
    assert "Traceback" not in output, output
    found = re.search(r"embedded Redis at redis://127\.0\.0\.1:(\d+)", output)
    assert found, output
    redis_port = int(found.group(1))
    wait_for(lambda: not _listening(redis_port), timeout=15, what="the embedded Redis to stop")


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True
