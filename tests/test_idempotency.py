"""Idempotency keys (issue "Background jobs you can see, steer and trust", point 4): a repeated
`Idempotency-Key` for the same function within BGFN_IDEMPOTENCY_WINDOW is answered 202 with the
first job's id and enqueues nothing; concurrent repeats enqueue once; keys are per function; after
the window the key is new again."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from flask.testing import FlaskClient
from rq import Queue
from rq.serializers import JSONSerializer

from bgfn import defaults, idempotency
from tests.conftest import run_worker_burst
from tests.helpers import HttpResult, http, wait_for

SITE = {
    "functions/mark-background.py": """
        import os, pathlib
        def handler(event, context):
            with open(pathlib.Path(os.environ["MARK_DIR"], context.aws_request_id), "a") as file:
                file.write("ran\\n")
    """,
    "functions/other-background.py": """
        def handler(event, context):
            return None
    """,
}

FUNCTION = "/.netlify/functions/mark-background"
OTHER = "/.netlify/functions/other-background"


@pytest.fixture
def site(make_site: Callable[..., Path]) -> Path:
    return make_site(SITE)


def queued_ids(redis_client: redis.Redis) -> list[str]:
    return Queue(defaults.QUEUE, connection=redis_client, serializer=JSONSerializer).get_job_ids()


def job_keys(redis_client: redis.Redis) -> list[bytes]:
    """Every RQ job record in Redis (rq:job:<id>, not its sub-keys)."""
    return [k for k in redis_client.scan_iter(match="rq:job:*") if k.count(b":") == 2]


def post_with_key(client: FlaskClient, path: str, key: str) -> tuple[int, str | None, str | None]:
    response = client.post(path, data=b"x", headers={"Idempotency-Key": key})
    return (response.status_code, response.headers.get("X-Bgfn-Job-Id"),
            response.headers.get("X-Bgfn-Idempotent-Replay"))


def test_repeat_within_the_window_answers_the_first_job_and_runs_once(
        site: Path, start_server: Callable[..., str], redis_client: redis.Redis, redis_url: str,
        tmp_path: Path) -> None:
    base = start_server(site)
    headers = [("Idempotency-Key", "order-42")]
    first = http(base, "POST", FUNCTION, b"one", headers)
    assert first.status == 202, first.text
    job_id = first.header("X-Bgfn-Job-Id")
    assert job_id
    assert first.header("X-Bgfn-Idempotent-Replay") is None

    repeats = [http(base, "POST", FUNCTION, b"two", headers) for _ in range(3)]
    for repeat in repeats:
        assert repeat.status == 202, repeat.text
        assert repeat.body == b""
        assert repeat.header("X-Bgfn-Job-Id") == job_id
        assert repeat.header("X-Bgfn-Idempotent-Replay") == "true"
        assert repeat.header("Location") == f"/.bgfn/jobs/{job_id}"
    assert queued_ids(redis_client) == [job_id]
    assert len(job_keys(redis_client)) == 1

    # The key is remembered for the default window (24 h), per function.
    ttl = redis_client.ttl(idempotency.redis_key("mark-background", "order-42"))
    assert defaults.IDEMPOTENCY_WINDOW - 60 < ttl <= defaults.IDEMPOTENCY_WINDOW

    marks = tmp_path / "marks"
    marks.mkdir()
    run_worker_burst(site, redis_url, MARK_DIR=str(marks))
    assert sorted(p.name for p in marks.iterdir()) == [job_id]
    assert (marks / job_id).read_text() == "ran\n"

    # A repeat after the job finished (still within the window) is still the same job, not a new run.
    after = http(base, "POST", FUNCTION, b"three", headers)
    assert (after.status, after.header("X-Bgfn-Job-Id"), after.header("X-Bgfn-Idempotent-Replay")) == (
        202, job_id, "true")
    assert queued_ids(redis_client) == []


def test_concurrent_repeats_through_gunicorn_enqueue_once(
        site: Path, start_server: Callable[..., str], redis_client: redis.Redis) -> None:
    base = start_server(site, "--workers", "2", "--threads", "8")
    count = 20
    barrier = threading.Barrier(count)
    answers: list[HttpResult | BaseException] = [RuntimeError("no answer")] * count

    def send(index: int) -> None:
        try:
            barrier.wait(timeout=30)
            answers[index] = http(base, "POST", FUNCTION, f"body {index}".encode(),
                                  [("Idempotency-Key", "same-key-for-all")], timeout=60)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertions below
            answers[index] = exc

    threads = [threading.Thread(target=send, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=90)
    assert not any(t.is_alive() for t in threads)

    results = [a for a in answers if isinstance(a, HttpResult)]
    assert len(results) == count, [a for a in answers if not isinstance(a, HttpResult)]
    assert [r.status for r in results] == [202] * count, [(r.status, r.text) for r in results]
    ids = {r.header("X-Bgfn-Job-Id") for r in results}
    assert len(ids) == 1 and None not in ids, ids
    (job_id,) = ids
    replays = [r.header("X-Bgfn-Idempotent-Replay") for r in results]
    assert replays.count("true") == count - 1, replays  # exactly one request stored the job
    assert queued_ids(redis_client) == [job_id]
    assert len(job_keys(redis_client)) == 1


def test_keys_are_per_function_and_absent_keys_never_collapse(
        site: Path, make_client: Callable[..., FlaskClient], redis_client: redis.Redis) -> None:
    client = make_client(site)
    status, mark_id, replay = post_with_key(client, FUNCTION, "shared")
    assert (status, replay) == (202, None)
    status, other_id, replay = post_with_key(client, OTHER, "shared")
    assert (status, replay) == (202, None)
    assert other_id != mark_id

    # Repeats of each land on their own function's job.
    assert post_with_key(client, FUNCTION, "shared") == (202, mark_id, "true")
    assert post_with_key(client, OTHER, "shared") == (202, other_id, "true")
    # Another key of the same function is another job; so is a request without a key.
    status, third_id, replay = post_with_key(client, FUNCTION, "another")
    assert (status, replay) == (202, None) and third_id not in (mark_id, other_id)
    plain = [client.post(FUNCTION).headers["X-Bgfn-Job-Id"] for _ in range(2)]
    assert len(set(plain)) == 2
    assert sorted(queued_ids(redis_client)) == sorted([mark_id, other_id, third_id, *plain])


def test_key_is_new_again_after_the_window(site: Path, make_client: Callable[..., FlaskClient],
                                           redis_client: redis.Redis) -> None:
    client = make_client(site, idempotency_window=1)
    status, first_id, _ = post_with_key(client, FUNCTION, "short-lived")
    assert status == 202
    assert post_with_key(client, FUNCTION, "short-lived") == (202, first_id, "true")
    name = idempotency.redis_key("mark-background", "short-lived")
    assert 0 < redis_client.pttl(name) <= 1000

    wait_for(lambda: not redis_client.exists(name), timeout=10, what="the idempotency window to pass")
    status, second_id, replay = post_with_key(client, FUNCTION, "short-lived")
    assert (status, replay) == (202, None)
    assert second_id != first_id
    assert queued_ids(redis_client) == [first_id, second_id]
    # The new job holds the key for a new window.
    assert post_with_key(client, FUNCTION, "short-lived") == (202, second_id, "true")


@pytest.mark.parametrize("key", ["", "x" * 256, "tab\there"])
def test_unusable_key_is_400_and_nothing_is_queued(site: Path, make_client: Callable[..., FlaskClient],
                                                   redis_client: redis.Redis, key: str) -> None:
    client = make_client(site)
    response = client.post(FUNCTION, headers={"Idempotency-Key": key})
    assert response.status_code == 400, response.data
    assert response.get_json()["errorType"] == "BadIdempotencyKey"
    assert queued_ids(redis_client) == []
    assert not list(redis_client.scan_iter(match=idempotency.KEY_PREFIX + "*"))
