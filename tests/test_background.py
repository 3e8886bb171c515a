"""Background invocations at the web tier (CONTRACT §6, §7): the 202 answer, the job stored in
Redis before it, the event the worker rebuilds, the body limit, and Redis being unavailable."""

from __future__ import annotations

import base64
import io
import json
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from bgfn import defaults
from bgfn.app import create_app
from bgfn.redis_server import free_port
from tests.conftest import load, run_worker_burst
from tests.helpers import http

# Each background function writes what it saw to $MARK_DIR/<request id>.json.
RECORD = """
    import json, os, pathlib
    def record(event, context, **extra):
        seen = {"event": event, "function_name": context.function_name,
                "request_id": context.aws_request_id,
                "remaining": context.get_remaining_time_in_millis(), **extra}
        pathlib.Path(os.environ["MARK_DIR"], context.aws_request_id + ".json").write_text(json.dumps(seen))
"""

SITE = {
    "functions/_shared/record.py": RECORD,
    "functions/echo-background.py": """
        from _shared.record import record
        def handler(event, context):
            record(event, context)
            return {"statusCode": 200, "body": "never sent to the caller"}
    """,
    "functions/async-background.py": """
        import asyncio
        from _shared.record import record
        async def handler(event, context):
            await asyncio.sleep(0.01)
            record(event, context, was_async=True)
    """,
    "functions/flagged.py": """
        from _shared.record import record
        config = {"background": True, "timeout": 5}
        def handler(event, context):
            record(event, context)
    """,
    "functions/echo.py": """
        import json
        def handler(event, context):
            return {"statusCode": 200, "headers": {"content-type": "application/json"}, "body": json.dumps(event)}
    """,
}


@pytest.fixture
def site(make_site: Callable[..., Path]) -> Path:
    return make_site(SITE)


@pytest.fixture
def client(site: Path, make_client: Callable[..., FlaskClient]) -> FlaskClient:
    return make_client(site)


def fetch(redis_client: redis.Redis, job_id: str) -> Job:
    return Job.fetch(job_id, connection=redis_client, serializer=JSONSerializer)


def queue_of(redis_client: redis.Redis) -> Queue:
    return Queue(defaults.QUEUE, connection=redis_client, serializer=JSONSerializer)


def seen(marks: Path, job_id: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((marks / f"{job_id}.json").read_text())
    return data


def test_answer_is_202_empty_without_content_type(client: FlaskClient) -> None:
    response = client.post("/.netlify/functions/echo-background", data=b'{"a": 1}',
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 202
    assert response.data == b""
    assert response.headers.get("Content-Length") == "0"
    assert "Content-Type" not in response.headers
    assert response.headers.get("X-Bgfn-Job-Id")


def test_job_is_in_redis_as_json_when_answered(client: FlaskClient, redis_client: redis.Redis) -> None:
    # No worker runs: whatever is in Redis after the answer was put there before it.
    response = client.post("/.netlify/functions/echo-background/sub?x=1", data=b"hello",
                           headers={"Content-Type": "text/plain"})
    assert response.status_code == 202
    job_id = response.headers["X-Bgfn-Job-Id"]

    job = fetch(redis_client, job_id)
    assert job.get_status() == JobStatus.QUEUED
    assert job_id in queue_of(redis_client).job_ids
    assert job.func_name == "bgfn.worker.run_job"
    name, event, meta = job.args
    assert name == "echo-background"
    assert event["path"] == "/.netlify/functions/echo-background/sub"
    assert event["body"] == "hello"
    assert event["queryStringParameters"] == {"x": "1"}
    assert meta["request_id"] == job_id
    # Netlify's limits and retries by default: 15 minutes, retried after 60 s then 120 s.
    assert job.timeout == 900
    assert job.retries_left == 2
    assert job.retry_intervals == [60, 120]

    raw = redis_client.hget(f"rq:job:{job_id}", "data")
    assert isinstance(raw, bytes)
    try:
        payload = zlib.decompress(raw)
    except zlib.error:
        payload = raw
    assert not payload.startswith(b"\x80"), "the job data is a pickle"
    decoded = json.loads(payload)  # JSON, not pickle
    assert decoded[0] == "bgfn.worker.run_job"
    assert decoded[2][0] == "echo-background"


def test_per_function_timeout_and_configured_retries_reach_the_job(
        site: Path, make_client: Callable[..., FlaskClient], redis_client: redis.Redis) -> None:
    client = make_client(site, retry_delays=(1, 2), background_timeout=20)
    flagged = fetch(redis_client, client.post("/.netlify/functions/flagged").headers["X-Bgfn-Job-Id"])
    assert flagged.timeout == 5
    assert flagged.retry_intervals == [1, 2]
    echo = fetch(redis_client, client.post("/.netlify/functions/echo-background").headers["X-Bgfn-Job-Id"])
    assert echo.timeout == 20
    client = make_client(site, retry_delays=())
    job = fetch(redis_client, client.post("/.netlify/functions/flagged").headers["X-Bgfn-Job-Id"])
    assert not job.retries_left


def test_worker_rebuilds_the_event_the_function_would_see(site: Path, start_server: Callable[..., str],
                                                         redis_url: str, redis_client: redis.Redis,
                                                         marks: Path) -> None:
    # A real server: the in-process test client merges repeated headers before bgfn sees them.
    base = start_server(site)
    headers = [("Content-Type", "text/plain; charset=utf-8"), ("X-Multi", "one"), ("X-Multi", "two"),
               ("X-Case", "Kept")]
    query = "a=1&a=2&b=x%20y&empty="
    body = "héllo wörld".encode()
    response = http(base, "PUT", f"/.netlify/functions/echo-background/deep/path?{query}", body=body,
                    headers=headers)
    assert response.status == 202
    assert response.body == b""
    assert response.header("Content-Length") == "0"
    assert response.header("Content-Type") is None
    job_id = response.header("X-Bgfn-Job-Id")
    assert job_id
    assert fetch(redis_client, job_id).get_status() == JobStatus.QUEUED
    # What a synchronous function sees for the same request.
    sync = http(base, "PUT", f"/.netlify/functions/echo/deep/path?{query}", body=body, headers=headers)
    expected = json.loads(sync.body)

    run_worker_burst(site, redis_url, MARK_DIR=str(marks))
    got = seen(marks, job_id)
    event = got["event"]
    assert event["httpMethod"] == "PUT"
    assert event["path"] == "/.netlify/functions/echo-background/deep/path"
    assert event["body"] == "héllo wörld"
    assert event["isBase64Encoded"] is False
    assert event["headers"]["x-multi"] == "one, two"
    assert event["multiValueHeaders"]["x-multi"] == ["one", "two"]
    assert event["headers"]["x-case"] == "Kept"
    assert event["headers"]["content-type"] == "text/plain; charset=utf-8"
    assert event["headers"]["client-ip"] == "127.0.0.1"
    assert event["queryStringParameters"] == {"a": "1, 2", "b": "x y", "empty": ""}
    assert event["multiValueQueryStringParameters"] == {"a": ["1", "2"], "b": ["x y"], "empty": [""]}
    assert event["rawQuery"] == query
    assert event["rawUrl"] == f"{base}/.netlify/functions/echo-background/deep/path?{query}"
    # Everything but the path is what the synchronous function saw.
    for key in ("path", "rawUrl"):
        event.pop(key)
        expected.pop(key)
    assert event == expected
    assert got["function_name"] == "echo-background"
    assert got["request_id"] == job_id
    job = fetch(redis_client, job_id)
    assert job.get_status() == JobStatus.FINISHED
    assert job.return_value() == {"statusCode": 200, "body": "never sent to the caller"}


def test_binary_body_reaches_the_worker_as_base64(client: FlaskClient, site: Path, redis_url: str,
                                                  marks: Path) -> None:
    body = bytes(range(256)) * 4
    response = client.post("/.netlify/functions/echo-background", data=body,
                           headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 202
    no_type = client.post("/.netlify/functions/echo-background", data=b"\xff\x00raw")
    assert no_type.status_code == 202

    run_worker_burst(site, redis_url, MARK_DIR=str(marks))
    event = seen(marks, response.headers["X-Bgfn-Job-Id"])["event"]
    assert event["isBase64Encoded"] is True
    assert base64.b64decode(event["body"]) == body
    event = seen(marks, no_type.headers["X-Bgfn-Job-Id"])["event"]
    assert event["isBase64Encoded"] is True
    assert base64.b64decode(event["body"]) == b"\xff\x00raw"


def test_no_body_is_none(client: FlaskClient, site: Path, redis_url: str, marks: Path) -> None:
    response = client.get("/.netlify/functions/echo-background")
    assert response.status_code == 202
    run_worker_burst(site, redis_url, MARK_DIR=str(marks))
    event = seen(marks, response.headers["X-Bgfn-Job-Id"])["event"]
    assert event["body"] is None
    assert event["httpMethod"] == "GET"
    assert event["queryStringParameters"] == {}


def test_async_handler_and_remaining_time(client: FlaskClient, site: Path, redis_url: str,
                                         redis_client: redis.Redis, marks: Path) -> None:
    async_id = client.post("/.netlify/functions/async-background").headers["X-Bgfn-Job-Id"]
    echo_id = client.post("/.netlify/functions/echo-background").headers["X-Bgfn-Job-Id"]
    flagged_id = client.post("/.netlify/functions/flagged").headers["X-Bgfn-Job-Id"]
    run_worker_burst(site, redis_url, MARK_DIR=str(marks))

    got = seen(marks, async_id)
    assert got["was_async"] is True
    assert fetch(redis_client, async_id).get_status() == JobStatus.FINISHED
    # The 15 minutes count from the start of the run.
    remaining = seen(marks, echo_id)["remaining"]
    assert 890_000 < remaining <= 900_000
    # A per-function timeout is what the context counts down from.
    remaining = seen(marks, flagged_id)["remaining"]
    assert 4_000 < remaining <= 5_000


def test_body_over_256_kib_is_413_and_not_queued(client: FlaskClient, redis_client: redis.Redis) -> None:
    limit = 256 * 1024
    over = client.post("/.netlify/functions/echo-background", data=b"x" * (limit + 1),
                       headers={"Content-Type": "text/plain"})
    assert over.status_code == 413
    assert over.mimetype == "application/json"
    error = over.get_json()
    assert error["errorType"] and str(limit) in error["errorMessage"]
    assert queue_of(redis_client).count == 0
    assert not redis_client.keys("rq:job:*")

    at_limit = client.post("/.netlify/functions/echo-background", data=b"x" * limit,
                           headers={"Content-Type": "text/plain"})
    assert at_limit.status_code == 202
    assert queue_of(redis_client).count == 1


def test_body_over_limit_without_content_length_is_413(client: FlaskClient, redis_client: redis.Redis) -> None:
    # A chunked request: no Content-Length, the body is read up to the limit and no further.
    response = client.post("/.netlify/functions/echo-background", input_stream=io.BytesIO(b"y" * (320 * 1024)),
                           headers={"Content-Type": "text/plain"},
                           environ_overrides={"wsgi.input_terminated": True})
    assert response.status_code == 413
    assert queue_of(redis_client).count == 0
    small = client.post("/.netlify/functions/echo-background", input_stream=io.BytesIO(b"small"),
                        headers={"Content-Type": "text/plain"}, environ_overrides={"wsgi.input_terminated": True})
    assert small.status_code == 202
    assert fetch(redis_client, small.headers["X-Bgfn-Job-Id"]).args[1]["body"] == "small"


def unreachable_client(site: Path) -> FlaskClient:
    port = free_port()
    settings, registry = load(site, redis_url=f"redis://127.0.0.1:{port}/0")
    connection = redis.Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_connect_timeout=0.5, socket_timeout=0.5)
    return create_app(settings, registry, connection).test_client()


def assert_503(response: Any) -> None:
    assert response.status_code == 503
    retry_after = response.headers.get("Retry-After")
    assert retry_after is not None and int(retry_after) > 0
    assert response.mimetype == "application/json"
    error = response.get_json()
    assert error["errorType"]
    assert error["errorMessage"]
    assert "X-Bgfn-Job-Id" not in response.headers


def test_unreachable_redis_is_503_never_202(site: Path, redis_client: redis.Redis) -> None:
    client = unreachable_client(site)
    started = time.monotonic()
    response = client.post("/.netlify/functions/echo-background", data=b"payload",
                           headers={"Content-Type": "text/plain"})
    assert time.monotonic() - started < 10
    assert_503(response)
    # Synchronous functions do not need Redis.
    assert client.get("/.netlify/functions/echo").status_code == 200
    assert not redis_client.keys("rq:*")


def test_redis_refusing_writes_is_503(client: FlaskClient, redis_client: redis.Redis) -> None:
    """A Redis that is up but cannot take the job (out of memory) is a 503 too, with nothing left behind."""
    config = redis_client.config_get("maxmemory*")
    redis_client.config_set("maxmemory-policy", "noeviction")
    redis_client.config_set("maxmemory", "1")
    try:
        response = client.post("/.netlify/functions/echo-background", data=b"payload",
                               headers={"Content-Type": "text/plain"})
    finally:
        redis_client.config_set("maxmemory", config["maxmemory"])
        redis_client.config_set("maxmemory-policy", config["maxmemory-policy"])
    assert_503(response)
    assert queue_of(redis_client).count == 0
    assert not redis_client.keys("rq:job:*")
    # Once Redis takes writes again, so does bgfn.
    assert client.post("/.netlify/functions/echo-background").status_code == 202


def test_server_without_redis_is_503(site: Path) -> None:
    settings, registry = load(site)
    client = create_app(settings, registry, None).test_client()
    assert_503(client.post("/.netlify/functions/echo-background"))


def test_job_ids_are_unique(client: FlaskClient, redis_client: redis.Redis) -> None:
    ids = {client.post("/.netlify/functions/echo-background").headers["X-Bgfn-Job-Id"] for _ in range(5)}
    assert len(ids) == 5
    assert set(queue_of(redis_client).job_ids) == ids
