"""Completion callbacks (issue "Background jobs you can see, steer and trust", point 6): when a job
ends (succeeded, failed after its last attempt, canceled) a real `bgfn worker` POSTs the job's status
JSON, signed with BGFN_CALLBACK_SECRET, to the X-Bgfn-Callback-Url, retrying with backoff until the
receiver answers 2xx. Only allowlisted hosts; redirects are not followed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient
from rq import Queue
from rq.job import Job
from rq.registry import BaseRegistry, FailedJobRegistry, FinishedJobRegistry
from rq.serializers import JSONSerializer

from bgfn import defaults
from bgfn.callbacks import DELIVERY_FUNCTION, verify
from tests.helpers import Process, http, wait_for

SECRET = "test-callback-secret-0123456789"
CALLBACKS = {"BGFN_CALLBACK_HOSTS": "127.0.0.1", "BGFN_CALLBACK_SECRET": SECRET}

SITE = {
    "functions/ok-background.py": """
        def handler(event, context):
            return {"statusCode": 200, "body": "fine"}
    """,
    "functions/boom-background.py": """
        import os, pathlib
        config = {"retry_delays": [0]}
        def handler(event, context):
            with open(pathlib.Path(os.environ["MARK_DIR"], context.aws_request_id), "a") as file:
                file.write("attempt\\n")
            raise RuntimeError("boom")
    """,
    "functions/hang-background.py": """
        import os, pathlib, time
        config = {"max_attempts": 1}
        def handler(event, context):
            pathlib.Path(os.environ["MARK_DIR"], context.aws_request_id).write_text("started")
            time.sleep(120)
    """,
}


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def data(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.body)
        return value


class Receiver:
    """An HTTP receiver on 127.0.0.1:<free port>. `answers[path]` lists the statuses to give, in
    order (the last repeats; default 200); a 3xx redirects to /landing."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.answers: dict[str, list[int]] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.deliveries.append(Delivery(self.path, {k.lower(): v for k, v in self.headers.items()},
                                                    body, time.time()))
                planned = receiver.answers.get(self.path, [200])
                status = planned.pop(0) if len(planned) > 1 else planned[0]
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", "/landing")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def to(self, path: str) -> list[Delivery]:
        return [d for d in self.deliveries if d.path == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


@pytest.fixture
def site(make_site: Callable[..., Path]) -> Path:
    return make_site(SITE)


def client_for(make_client: Callable[..., FlaskClient], site: Path, **settings: Any) -> FlaskClient:
    return make_client(site, callback_hosts=("127.0.0.1",), callback_secret=SECRET, **settings)


def accept(client: FlaskClient, name: str, callback: str) -> str:
    response = client.post(f"/.netlify/functions/{name}", headers={"X-Bgfn-Callback-Url": callback})
    assert response.status_code == 202, response.data
    return str(response.headers["X-Bgfn-Job-Id"])


def callback_queue(redis_client: redis.Redis) -> Queue:
    return Queue(defaults.QUEUE, connection=redis_client, serializer=JSONSerializer)


def delivery_count(queue: Queue, registry: type[BaseRegistry] | None = None) -> int:
    """Callback deliveries waiting in the queue, or in one of its registries."""
    ids = queue.get_job_ids() if registry is None else registry(queue=queue).get_job_ids()
    jobs = Job.fetch_many(ids, connection=queue.connection, serializer=JSONSerializer)
    return sum(1 for job in jobs if job is not None and job.func_name == DELIVERY_FUNCTION)


def assert_signed(delivery: Delivery) -> None:
    header = delivery.headers.get("x-bgfn-signature", "")
    assert header.startswith("t="), delivery.headers
    assert verify(SECRET, header, delivery.body)
    assert not verify(SECRET + "-wrong", header, delivery.body)
    assert not verify(SECRET, header, delivery.body + b" ")
    assert delivery.headers.get("content-type") == "application/json"


def test_success_is_posted_signed_and_retried_until_2xx(
        site: Path, start_server: Callable[..., str], start_worker: Callable[..., Process],
        receiver: Receiver) -> None:
    base = start_server(site, **CALLBACKS)
    worker = start_worker(site, **CALLBACKS, BGFN_CALLBACK_RETRY_DELAYS="2,2")
    receiver.answers["/hook"] = [500, 200]
    accepted = http(base, "POST", "/.netlify/functions/ok-background",
                    headers=[("X-Bgfn-Callback-Url", receiver.url("/hook"))])
    assert accepted.status == 202, accepted.text
    job_id = accepted.header("X-Bgfn-Job-Id")

    wait_for(lambda: len(receiver.to("/hook")) >= 2, timeout=30, what="the retried delivery")
    first, second = receiver.to("/hook")[:2]
    print(f"callback retried {second.at - first.at:.2f} s after the 500 (delay 2 s)")
    # RQ's scheduler keeps whole seconds, so a 2 s delay is at least 1 s.
    assert 1.0 <= second.at - first.at < 2 + 10
    for delivery in (first, second):
        assert_signed(delivery)
    status = http(base, "GET", f"/.bgfn/jobs/{job_id}")
    assert status.status == 200
    assert second.data == json.loads(status.body)  # the same JSON as the status URL
    assert second.data["id"] == job_id
    assert second.data["state"] == "succeeded"
    assert second.data["result"] == {"statusCode": 200, "body": "fine"}
    # A 2xx ends the deliveries.
    assert worker.alive()
    assert len(receiver.to("/hook")) == 2


def test_a_delivery_is_kept_as_long_as_the_configured_ttls_keep_its_invocation(
        site: Path, make_client: Callable[..., FlaskClient], start_worker: Callable[..., Process],
        receiver: Receiver, redis_client: redis.Redis) -> None:
    # BGFN_RESULT_TTL bounds every finished record, the callback deliveries' too (not bgfn's 7-day default).
    client = client_for(make_client, site, result_ttl=120, failure_ttl=300)
    job_id = accept(client, "ok-background", receiver.url("/hook"))
    start_worker(site, **CALLBACKS)
    wait_for(lambda: receiver.to("/hook"), timeout=30, what="the callback")
    queue = callback_queue(redis_client)

    def delivered() -> list[Job]:
        finished = Job.fetch_many(FinishedJobRegistry(queue=queue).get_job_ids(), connection=redis_client,
                                  serializer=JSONSerializer)
        return [j for j in finished if j is not None and j.func_name == DELIVERY_FUNCTION]

    [delivery] = wait_for(delivered, timeout=15, what="the delivery job to finish")
    assert delivery.meta["callback_for"] == job_id
    assert (delivery.result_ttl, delivery.failure_ttl) == (120, 300)
    assert 100 < redis_client.ttl(f"rq:job:{delivery.id}") <= 120
    assert 100 < redis_client.ttl(f"rq:job:{job_id}") <= 120


def test_failure_is_posted_once_after_the_last_attempt(
        site: Path, make_client: Callable[..., FlaskClient], start_worker: Callable[..., Process],
        receiver: Receiver, redis_client: redis.Redis, marks: Path) -> None:
    client = client_for(make_client, site)
    job_id = accept(client, "boom-background", receiver.url("/hook"))
    start_worker(site, **CALLBACKS, MARK_DIR=str(marks))

    wait_for(lambda: receiver.to("/hook"), timeout=30, what="the callback")
    deliveries = callback_queue(redis_client)
    wait_for(lambda: delivery_count(deliveries) == 0 and delivery_count(deliveries, FinishedJobRegistry) >= 1,
             timeout=15,
             what="every delivery to be done")
    assert (marks / job_id).read_text() == "attempt\nattempt\n"  # two attempts, then the callback
    [delivery] = receiver.to("/hook")  # none for the first, retried, failure
    assert_signed(delivery)
    assert delivery.data["state"] == "failed"
    assert delivery.data["attempts"] == 2
    assert delivery.data["error"]["type"] == "RuntimeError"
    assert delivery.data["error"]["message"] == "boom"


def test_cancel_is_posted(site: Path, make_client: Callable[..., FlaskClient],
                          start_worker: Callable[..., Process], receiver: Receiver, marks: Path) -> None:
    client = client_for(make_client, site)
    job_id = accept(client, "boom-background", receiver.url("/canceled"))
    canceled = client.delete(f"/.bgfn/jobs/{job_id}")
    assert canceled.status_code == 200, canceled.data
    assert canceled.get_json()["state"] == "canceled"

    start_worker(site, **CALLBACKS, MARK_DIR=str(marks))
    wait_for(lambda: receiver.to("/canceled"), timeout=30, what="the callback")
    [delivery] = receiver.to("/canceled")
    assert_signed(delivery)
    assert delivery.data["id"] == job_id
    assert delivery.data["state"] == "canceled"
    assert not (marks / job_id).exists()  # never ran


def test_job_lost_with_its_worker_is_posted_as_failed(
        site: Path, make_client: Callable[..., FlaskClient], start_worker: Callable[..., Process],
        receiver: Receiver, marks: Path) -> None:
    client = client_for(make_client, site)
    env = {**CALLBACKS, "MARK_DIR": str(marks), "BGFN_LOST_JOB_TIMEOUT": "3"}
    worker = start_worker(site, **env)
    job_id = accept(client, "hang-background", receiver.url("/lost"))  # max_attempts = 1
    wait_for(lambda: (marks / job_id).exists(), timeout=30, what="the job to start")
    children = subprocess.run(["pgrep", "-P", str(worker.pid)], capture_output=True, text=True, check=False)
    os.killpg(worker.pid, signal.SIGKILL)
    for pid in (int(p) for p in children.stdout.split()):
        try:
            os.killpg(pid, signal.SIGKILL)  # the work horse has a process group of its own
        except (ProcessLookupError, PermissionError):
            pass
    start_worker(site, **env)

    wait_for(lambda: receiver.to("/lost"), timeout=30, what="the callback of the lost job")
    [delivery] = receiver.to("/lost")
    assert_signed(delivery)
    assert delivery.data["state"] == "failed"
    assert delivery.data["error"]["type"] == "WorkerLost"


def test_redirects_are_not_followed(site: Path, make_client: Callable[..., FlaskClient],
                                    start_worker: Callable[..., Process], receiver: Receiver,
                                    redis_client: redis.Redis) -> None:
    client = client_for(make_client, site)
    receiver.answers["/hop"] = [302]
    accept(client, "ok-background", receiver.url("/hop"))
    start_worker(site, **CALLBACKS, BGFN_CALLBACK_RETRY_DELAYS="")  # no retries: one try

    deliveries = callback_queue(redis_client)
    wait_for(lambda: delivery_count(deliveries, FailedJobRegistry) == 1, timeout=30,
             what="the delivery to fail on the redirect")
    assert len(receiver.to("/hop")) == 1
    assert receiver.to("/landing") == []


@pytest.mark.parametrize(("settings", "url", "why"), [
    ({}, "http://127.0.0.1/hook", "BGFN_CALLBACK_HOSTS"),
    ({"callback_hosts": ("127.0.0.1",)}, "http://127.0.0.1/hook", "BGFN_CALLBACK_SECRET"),
    ({"callback_secret": SECRET}, "http://127.0.0.1/hook", "BGFN_CALLBACK_HOSTS"),
    ({"callback_hosts": ("hooks.example.com",), "callback_secret": SECRET}, "http://127.0.0.1/hook",
     "not allowed"),
    ({"callback_hosts": ("127.0.0.1",), "callback_secret": SECRET}, "ftp://127.0.0.1/hook", "http(s)"),
    ({"callback_hosts": ("127.0.0.1",), "callback_secret": SECRET}, "http://u:p@127.0.0.1/hook",
     "credentials"),
])
def test_refused_callback_is_400_and_nothing_is_queued(
        site: Path, make_client: Callable[..., FlaskClient], redis_client: redis.Redis,
        settings: dict[str, Any], url: str, why: str) -> None:
    client = make_client(site, **settings)
    response = client.post("/.netlify/functions/ok-background",
                           headers={"X-Bgfn-Callback-Url": url, "Idempotency-Key": "k1"})
    assert response.status_code == 400, response.data
    body = response.get_json()
    assert body["errorType"] == "CallbackRejected"
    assert why in body["errorMessage"]
    assert "X-Bgfn-Job-Id" not in response.headers
    assert Queue(defaults.QUEUE, connection=redis_client, serializer=JSONSerializer).count == 0
    assert not [k for k in redis_client.scan_iter(match="rq:job:*")]
    assert not [k for k in redis_client.scan_iter(match="bgfn:idempotency:*")]  # the key was not used up
