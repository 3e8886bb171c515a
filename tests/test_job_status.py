"""A handle on every background job (issue "Background jobs you can see, steer and trust", point 1):
the 202's `X-Bgfn-Job-Id` and `Location`, `GET /.bgfn/jobs/<id>` through every state, the logs a
run leaves, and `DELETE` on a queued and on a running job. Real Valkey, real `bgfn worker`s."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import ScheduledJobRegistry
from rq.results import Result
from rq.serializers import JSONSerializer

from bgfn import defaults
from bgfn.queue import make_queue
from tests.conftest import run_worker_burst
from tests.helpers import Process, http, wait_for

# mark(): appends "<time.time()>\n" to $MARK_DIR/<request id><suffix>.
# wait_gate(): blocks until the test creates $MARK_DIR/<request id>.go.
SHARED = """
    import os, pathlib, time
    def mark(context, suffix=""):
        path = pathlib.Path(os.environ["MARK_DIR"], context.aws_request_id + suffix)
        with open(path, "a") as file:
            file.write(f"{time.time()!r}\\n")
    def wait_gate(context):
        gate = pathlib.Path(os.environ["MARK_DIR"], context.aws_request_id + ".go")
        while not gate.exists():
            time.sleep(0.02)
"""

SITE = {
    "functions/_shared/marks.py": SHARED,
    "functions/ok-background.py": """
        import logging, sys
        from _shared.marks import mark
        def handler(event, context):
            mark(context)
            print("hello from print")
            print("hello from stderr", file=sys.stderr)
            logging.getLogger("x").warning("careful with %s", 42)
            return {"done": True, "who": event["queryStringParameters"].get("who")}
    """,
    "functions/fail-background.py": """
        from _shared.marks import mark
        config = {"max_attempts": 1}
        def handler(event, context):
            mark(context)
            print("about to fail")
            raise ValueError("bad input: 7")
    """,
    "functions/block-background.py": """
        from _shared.marks import mark, wait_gate
        config = {"max_attempts": 1}
        def handler(event, context):
            mark(context)
            wait_gate(context)
            mark(context, ".done")
            return "released"
    """,
    "functions/retry-background.py": """
        from _shared.marks import mark
        config = {"max_attempts": 2, "retry_delays": [2]}
        def handler(event, context):
            mark(context)
            raise RuntimeError("try again later")
    """,
    "functions/chatty-background.py": """
        config = {"max_attempts": 1}
        def handler(event, context):
            print("START-MARKER")
            for i in range(4000):
                print(f"line {i:05d} " + "x" * 20)
            print("END-MARKER")
    """,
    "functions/slow-background.py": """
        import time
        config = {"timeout": 1, "max_attempts": 1}
        def handler(event, context):
            print("going to sleep")
            time.sleep(60)
    """,
}


@pytest.fixture
def site(make_site: Callable[..., Path]) -> Path:
    return make_site(SITE)


def accept(client: FlaskClient, name: str, query: str = "") -> str:
    response = client.post(f"/.netlify/functions/{name}{query}")
    assert response.status_code == 202, response.data
    job_id = response.headers["X-Bgfn-Job-Id"]
    assert response.headers["Location"] == f"/.bgfn/jobs/{job_id}"
    return job_id


def status(client: FlaskClient, job_id: str) -> dict[str, Any]:
    response = client.get(f"/.bgfn/jobs/{job_id}")
    assert response.status_code == 200, response.data
    assert response.mimetype == "application/json"
    data = response.get_json()
    assert data["id"] == job_id
    return data


def wait_state(client: FlaskClient, job_id: str, state: str, timeout: float = 20.0,
               worker: Process | None = None) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        if worker is not None and not worker.alive():
            raise AssertionError(f"the worker exited: {worker.output()}")
        data = status(client, job_id)
        return data if data["state"] == state else None

    return wait_for(reached, timeout=timeout, what=f"job {job_id} to be {state}")


def when(stamp: str | None) -> float:
    assert stamp is not None and stamp.endswith("Z"), stamp
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def marked(marks: Path, job_id: str, suffix: str = "") -> list[float]:
    path = marks / (job_id + suffix)
    return [float(x) for x in path.read_text().split()] if path.exists() else []


def test_job_from_202_to_succeeded_through_gunicorn(
        site: Path, start_server: Callable[..., str], start_worker: Callable[..., Process], marks: Path) -> None:
    base = start_server(site)
    before = time.time()
    accepted = http(base, "POST", "/.netlify/functions/ok-background?who=ada")
    assert accepted.status == 202
    assert accepted.body == b""
    assert accepted.header("Content-Length") == "0"
    assert accepted.header("Content-Type") is None
    job_id = accepted.header("X-Bgfn-Job-Id")
    assert job_id is not None
    assert uuid.UUID(job_id).version == 4 and str(uuid.UUID(job_id)) == job_id
    assert accepted.header("Location") == f"/.bgfn/jobs/{job_id}"

    # No worker yet: the job waits.
    first = http(base, "GET", f"/.bgfn/jobs/{job_id}")
    assert first.status == 200
    assert first.header("Content-Type") == "application/json"
    queued = json.loads(first.body)
    assert queued["id"] == job_id
    assert queued["function"] == "ok-background"
    assert queued["state"] == "queued"
    assert (queued["attempts"], queued["max_attempts"]) == (0, 3)  # Netlify's default: 3 attempts
    assert queued["started_at"] is None and queued["ended_at"] is None
    assert before - 1 <= when(queued["accepted_at"]) <= time.time() + 1
    assert "result" not in queued and "error" not in queued

    worker = start_worker(site, MARK_DIR=str(marks))

    def finished() -> dict[str, Any] | None:
        assert worker.alive(), worker.output()
        data = json.loads(http(base, "GET", accepted.header("Location") or "").body)
        return data if data["state"] == "succeeded" else None

    done = wait_for(finished, timeout=20, what="the job to succeed")
    assert done["result"] == {"done": True, "who": "ada"}
    assert (done["attempts"], done["max_attempts"]) == (1, 3)
    assert "error" not in done
    accepted_at, started_at, ended_at = when(done["accepted_at"]), when(done["started_at"]), when(done["ended_at"])
    assert accepted_at <= started_at <= ended_at
    assert accepted_at == when(queued["accepted_at"])
    ran_at = marked(marks, job_id)
    assert len(ran_at) == 1 and started_at - 1 <= ran_at[0] <= ended_at + 1
    # What the function printed and logged, in order.
    logs = done["logs"]
    assert done["logs_truncated"] is False
    assert "hello from print\n" in logs
    assert "hello from stderr\n" in logs
    assert "WARNING x: careful with 42" in logs
    assert logs.index("hello from print") < logs.index("hello from stderr") < logs.index("careful with 42")
    assert "bgfn.worker" not in logs and "attempt 1 of" not in logs  # bgfn's own lines stay out


def test_failed_job_shows_its_error_and_logs(
        site: Path, make_client: Callable[..., FlaskClient], redis_url: str, marks: Path) -> None:
    client = make_client(site)
    job_id = accept(client, "fail-background")
    run_worker_burst(site, redis_url, MARK_DIR=str(marks))

    data = status(client, job_id)
    assert data["state"] == "failed"
    assert data["error"] == {"type": "ValueError", "message": "bad input: 7"}
    assert (data["attempts"], data["max_attempts"]) == (1, 1)
    assert "result" not in data
    assert data["started_at"] is not None
    assert when(data["started_at"]) <= when(data["ended_at"])
    assert data["logs"] == "about to fail\n"
    assert len(marked(marks, job_id)) == 1


def test_running_job_shows_running_until_it_finishes(
        site: Path, make_client: Callable[..., FlaskClient], start_worker: Callable[..., Process],
        marks: Path) -> None:
    client = make_client(site)
    worker = start_worker(site, MARK_DIR=str(marks), BGFN_SHUTDOWN_GRACE="1")
    job_id = accept(client, "block-background")

    wait_state(client, job_id, "running", worker=worker)
    wait_for(lambda: marked(marks, job_id), what="the handler to start")
    running = status(client, job_id)  # the handler runs: its attempt is recorded
    assert running["state"] == "running"
    assert running["attempts"] == 1
    assert running["started_at"] is not None and running["ended_at"] is None
    assert "result" not in running and "error" not in running
    assert status(client, job_id)["state"] == "running"  # blocked: still running

    (marks / f"{job_id}.go").touch()
    done = wait_state(client, job_id, "succeeded", worker=worker)
    assert done["result"] == "released"
    assert len(marked(marks, job_id, ".done")) == 1


def _scheduled_but_not_yet_registered(redis_client: redis.Redis, client: FlaskClient) -> tuple[Job, Queue]:
    """A job as RQ leaves it for a moment when a failed attempt's retry is scheduled: its failure
    recorded and its status already scheduled, but not yet in the scheduled registry (RQ adds it
    in a later pipeline)."""
    job_id = accept(client, "ok-background")
    queue = make_queue(redis_client, defaults.QUEUE)
    job = Job.fetch(job_id, connection=redis_client, serializer=JSONSerializer)
    queue.remove(job)
    Result.create_failure(job, ttl=600, exc_string="Traceback ...\nRuntimeError: first attempt failed")
    job.set_status(JobStatus.SCHEDULED)
    return job, queue


def _status_while(client: FlaskClient, job_id: str, after: float, change: Callable[[], object]) -> dict[str, Any]:
    """The job's status, read while `change` happens `after` seconds into the read (a worker or the
    scheduler moving the job on meanwhile)."""
    timer = threading.Timer(after, change)
    timer.start()
    try:
        return status(client, job_id)
    finally:
        timer.join()


def test_a_retry_being_scheduled_shows_its_next_attempt_once_rq_has_registered_it(
        site: Path, make_client: Callable[..., FlaskClient], redis_client: redis.Redis) -> None:
    client = make_client(site)
    job, queue = _scheduled_but_not_yet_registered(redis_client, client)
    due = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=60)
    # Registered 0.4 s later (a loaded worker's pipeline): the status read waits for it.
    view = _status_while(client, job.id, 0.4, lambda: ScheduledJobRegistry(queue=queue).schedule(job, due))
    assert view["state"] == "scheduled"
    assert view["error"] == {"type": "RuntimeError", "message": "first attempt failed"}
    assert view["next_attempt_at"] is not None, view
    assert datetime.fromisoformat(view["next_attempt_at"].replace("Z", "+00:00")) == due


def test_a_job_queued_by_the_scheduler_while_its_status_is_read_shows_as_queued(
        site: Path, make_client: Callable[..., FlaskClient], redis_client: redis.Redis) -> None:
    client = make_client(site)
    job, queue = _scheduled_but_not_yet_registered(redis_client, client)
    # The scheduler's move, 0.2 s into the read: out of the registry (it never was) and queued.
    view = _status_while(client, job.id, 0.2, lambda: queue.enqueue_job(job))
    assert view["state"] == "queued", view
    assert "next_attempt_at" not in view


def test_a_job_that_ran_again_while_its_status_was_read_shows_its_new_attempt_with_its_time(
        site: Path, make_client: Callable[..., FlaskClient], redis_client: redis.Redis) -> None:
    """Seen in a loaded CI run: while the read looked for attempt 1's retry, the job was queued, ran
    attempt 2, failed and was scheduled again; the view showed attempt 1 with attempt 3's time. The
    time found must go with the attempt shown."""
    client = make_client(site)
    job, queue = _scheduled_but_not_yet_registered(redis_client, client)
    job.meta["attempts"] = 1
    job.save_meta()
    due = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=60)

    def ran_again() -> None:  # attempt 2 started, failed, and its retry registered
        again = Job.fetch(job.id, connection=redis_client, serializer=JSONSerializer)
        again.meta["attempts"] = 2
        again.save_meta()
        ScheduledJobRegistry(queue=queue).schedule(again, due)

    view = _status_while(client, job.id, 0.2, ran_again)
    assert view["state"] == "scheduled"
    assert view["attempts"] == 2, view
    assert datetime.fromisoformat(view["next_attempt_at"].replace("Z", "+00:00")) == due


def test_job_waiting_for_its_retry_is_scheduled_and_can_be_canceled(
        site: Path, make_client: Callable[..., FlaskClient], start_worker: Callable[..., Process],
        marks: Path) -> None:
    client = make_client(site)
    worker = start_worker(site, MARK_DIR=str(marks))
    job_id = accept(client, "retry-background")

    waiting = wait_state(client, job_id, "scheduled", worker=worker)
    first_run = marked(marks, job_id)
    assert len(first_run) == 1
    assert (waiting["attempts"], waiting["max_attempts"]) == (1, 2)
    assert waiting["error"] == {"type": "RuntimeError", "message": "try again later"}
    assert waiting["started_at"] is not None and waiting["ended_at"] is None
    next_at = when(waiting["next_attempt_at"])
    assert first_run[0] + 2 - 1 <= next_at <= first_run[0] + 2 + 5

    response = client.delete(f"/.bgfn/jobs/{job_id}")
    assert response.status_code == 200, response.data
    assert response.get_json()["state"] == "canceled"
    # Let the retry's time pass (plus the scheduler's poll): it must not run.
    wait_for(lambda: time.time() > next_at + 2.5, timeout=10, interval=0.1, what="the retry time to pass")
    assert status(client, job_id)["state"] == "canceled"
    assert len(marked(marks, job_id)) == 1
    assert worker.alive()


def test_delete_cancels_a_queued_job_which_then_never_runs(
        site: Path, make_client: Callable[..., FlaskClient], redis_url: str, marks: Path) -> None:
    client = make_client(site)
    job_id = accept(client, "ok-background")
    kept_id = accept(client, "ok-background")

    response = client.delete(f"/.bgfn/jobs/{job_id}")
    assert response.status_code == 200, response.data
    canceled = response.get_json()
    assert canceled["state"] == "canceled"
    assert canceled["error"]["type"] == "Canceled"
    assert when(canceled["accepted_at"]) <= when(canceled["ended_at"]) <= time.time() + 1
    assert status(client, job_id)["state"] == "canceled"

    run_worker_burst(site, redis_url, MARK_DIR=str(marks))
    assert status(client, kept_id)["state"] == "succeeded"
    after = status(client, job_id)
    assert after["state"] == "canceled"
    assert after["attempts"] == 0 and after["started_at"] is None
    assert marked(marks, job_id) == []  # the handler never ran
    assert len(marked(marks, kept_id)) == 1

    # A final job cannot be canceled again.
    again = client.delete(f"/.bgfn/jobs/{job_id}")
    assert again.status_code == 409
    assert again.get_json()["errorType"] == "JobStateConflict"
    assert "canceled" in again.get_json()["errorMessage"]


def test_delete_stops_a_running_job_and_the_worker_goes_on(
        site: Path, make_client: Callable[..., FlaskClient], start_worker: Callable[..., Process],
        marks: Path) -> None:
    client = make_client(site)
    worker = start_worker(site, MARK_DIR=str(marks), BGFN_SHUTDOWN_GRACE="1")
    job_id = accept(client, "block-background")
    wait_for(lambda: marked(marks, job_id), what="the handler to start")
    assert status(client, job_id)["state"] == "running"

    response = client.delete(f"/.bgfn/jobs/{job_id}")
    assert response.status_code == 200, response.data
    assert response.get_json()["state"] in ("running", "canceled")  # the stop reaches the worker async

    stopped = wait_state(client, job_id, "canceled", worker=worker)
    assert stopped["error"]["type"] == "Canceled"
    assert stopped["ended_at"] is not None
    (marks / f"{job_id}.go").touch()  # too late: the work horse is gone

    # The worker survives and runs the next job; the stopped one is not retried.
    next_id = accept(client, "ok-background")
    wait_state(client, next_id, "succeeded", worker=worker)
    assert worker.alive()
    assert marked(marks, job_id, ".done") == []
    assert len(marked(marks, job_id)) == 1
    assert status(client, job_id)["state"] == "canceled"


def test_logs_keep_the_tail_when_a_run_prints_too_much(
        site: Path, make_client: Callable[..., FlaskClient], redis_url: str, marks: Path) -> None:
    client = make_client(site)
    job_id = accept(client, "chatty-background")
    run_worker_burst(site, redis_url, MARK_DIR=str(marks))

    data = status(client, job_id)
    assert data["state"] == "succeeded"
    assert data["result"] is None
    assert data["logs_truncated"] is True
    logs = data["logs"]
    assert len(logs) == defaults.JOB_LOG_LIMIT
    assert logs.endswith("line 03999 " + "x" * 20 + "\nEND-MARKER\n")
    assert "START-MARKER" not in logs
    assert "line 00000 " not in logs


def test_timed_out_job_says_so(site: Path, make_client: Callable[..., FlaskClient],
                               start_worker: Callable[..., Process], marks: Path) -> None:
    client = make_client(site)
    worker = start_worker(site, MARK_DIR=str(marks))
    job_id = accept(client, "slow-background")

    data = wait_state(client, job_id, "failed", worker=worker)
    assert data["error"] == {"type": "TimeoutError", "message": "Task timed out after 1.00 seconds"}
    assert data["logs"] == "going to sleep\n"
    assert (data["attempts"], data["max_attempts"]) == (1, 1)
    assert when(data["ended_at"]) - when(data["started_at"]) < 1.0 + 10.0
    assert worker.alive()


@pytest.mark.parametrize("job_id", [str(uuid.uuid4()), "not-a-job", "x" * 300])
def test_unknown_job_id_is_a_json_404(site: Path, make_client: Callable[..., FlaskClient], job_id: str) -> None:
    client = make_client(site)
    for method in ("GET", "DELETE"):
        response = client.open(f"/.bgfn/jobs/{job_id}", method=method)
        assert response.status_code == 404, (method, response.data)
        assert response.mimetype == "application/json"
        body = response.get_json()
        assert body["errorType"] == "JobNotFound"
        assert "No job has id" in body["errorMessage"]


def test_job_ids_differ_and_are_uuid4(site: Path, make_client: Callable[..., FlaskClient]) -> None:
    client = make_client(site)
    ids = {accept(client, "ok-background") for _ in range(20)}
    assert len(ids) == 20
    assert all(uuid.UUID(job_id).version == 4 and uuid.UUID(job_id).variant == uuid.RFC_4122
               and str(uuid.UUID(job_id)) == job_id for job_id in ids)
