"""bgfn stores a background invocation without RQ's Job object (bgfn.queue.job_fields): the hash
must be the one RQ's own `enqueue_call` stores, so RQ workers, registries and tools read it as
theirs. Compared field by field against RQ, with real Valkey, for each kind of function."""

from __future__ import annotations

import json
import socket
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from rq import Queue, Retry
from rq.job import Job, JobStatus

from bgfn.errors import QueueUnavailable
from bgfn.queue import JOB_FUNCTION, WAITING_KEY, compress, connect, enqueue_invocation, make_queue, retry_policy
from tests.conftest import load

SITE = {
    "functions/plain-background.py": "def handler(event, context):\n    return None\n",
    "functions/tuned-background.py": (
        'config = {"timeout": 12.6}\n'
        "def handler(event, context):\n    return None\n"
    ),
    "functions/once-background.py": "def handler(event, context):\n    return None\n",
}
BGFN_TOML = """
[functions."tuned-background"]
max_attempts = 4
retry_backoff = {base = 2, max = 30}
[functions."once-background"]
max_attempts = 1
"""
TIMESTAMPS = ("created_at", "enqueued_at")


def _rq_fields(queue: Queue, name: str, event: dict[str, Any], job_id: str, accepted_at: float,
               delays: list[int], timeout: int, callback_url: str | None) -> dict[bytes, bytes]:
    """What RQ's own enqueue_call stores for the same invocation."""
    meta: dict[str, Any] = {"function": name, "accepted_at": accepted_at, "max_attempts": len(delays) + 1}
    if callback_url is not None:
        meta["callback_url"] = callback_url
    retry: Retry | None = retry_policy(delays)
    queue.enqueue_call(JOB_FUNCTION, args=(name, event, {"request_id": job_id, "accepted_at": accepted_at}),
                       timeout=timeout, result_ttl=120, failure_ttl=300, description=name, job_id=job_id,
                       retry=retry, meta=meta)
    return queue.connection.hgetall(f"rq:job:{job_id}")  # type: ignore[return-value]


@pytest.mark.parametrize("name", ["plain-background", "tuned-background", "once-background"])
@pytest.mark.parametrize("callback_url", [None, "https://hooks.example.com/done"])
def test_the_stored_job_is_the_one_rq_enqueue_call_stores(
        name: str, callback_url: str | None, make_site: Callable[..., Path], redis_client: redis.Redis) -> None:
    site = make_site({**SITE, "bgfn.toml": BGFN_TOML})
    _, registry = load(site)
    function = registry.functions[name]
    queue = make_queue(redis_client, "parity")
    event = {"path": "/.netlify/functions/" + name, "body": "héllo", "headers": {"a": "1"}, "isBase64Encoded": False}

    job_id = enqueue_invocation(queue, function, event, "11111111-2222-4333-8444-555555555555",
                                callback_url=callback_url, result_ttl=120, failure_ttl=300)
    ours = redis_client.hgetall(f"rq:job:{job_id}")
    meta = json.loads(ours[b"meta"])
    delays = json.loads(ours.get(b"retry_intervals", b"[]"))
    redis_client.delete(f"rq:job:{job_id}")
    theirs = _rq_fields(queue, name, event, job_id, meta["accepted_at"], delays, int(ours[b"timeout"]),
                        callback_url)

    assert sorted(ours) == sorted(theirs)
    for key in ours:
        if key == b"data":
            assert zlib.decompress(ours[key]) == zlib.decompress(theirs[key])
        elif key.decode() not in TIMESTAMPS:
            assert ours[key] == theirs[key], key
    for key in TIMESTAMPS:  # the same format: RQ parses ours
        Job.fetch(job_id, connection=redis_client)  # would raise on a malformed timestamp
        assert len(ours[key.encode()]) == len(theirs[key.encode()])
    # Both queued once (RQ's enqueue pushed the same id again), the queue registered, the count kept.
    assert redis_client.lrange(queue.key, 0, -1) == [job_id.encode(), job_id.encode()]
    assert redis_client.sismember("rq:queues", queue.key)
    assert redis_client.hget(WAITING_KEY, name) == b"1"


def test_rq_reads_the_stored_job_back(make_site: Callable[..., Path], redis_client: redis.Redis) -> None:
    site = make_site({**SITE, "bgfn.toml": BGFN_TOML})
    _, registry = load(site)
    queue = make_queue(redis_client, "parity")
    event = {"path": "/x", "body": None}
    job_id = enqueue_invocation(queue, registry.functions["tuned-background"], event,
                                "aaaaaaaa-2222-4333-8444-555555555555", result_ttl=120, failure_ttl=300)
    job = Job.fetch(job_id, connection=redis_client, serializer=queue.serializer)
    assert job.func_name == JOB_FUNCTION
    assert job.args[0] == "tuned-background" and job.args[1] == event
    assert job.args[2]["request_id"] == job_id
    assert job.get_status() == JobStatus.QUEUED
    assert job.origin == "parity" and job.description == "tuned-background"
    assert job.timeout == 13 and job.result_ttl == 120 and job.failure_ttl == 300
    assert job.retries_left == 3 and job.retry_intervals is not None and len(job.retry_intervals) == 3
    assert abs(job.enqueued_at.timestamp() - job.meta["accepted_at"]) < 0.001  # type: ignore[union-attr]
    assert queue.job_ids == [job_id]


@pytest.mark.parametrize("size", [1, 300, 511, 512, 5_000, 40_000, 300_000])
def test_job_data_compression_reads_back_and_is_as_small_as_zlibs_default(size: int) -> None:
    text = json.dumps([{"n": i, "word": "abcdefghij"[i % 10] * (i % 7)} for i in range(size // 10)])
    data = text.encode()[:size].ljust(size, b" ")
    packed = compress(data)
    assert zlib.decompress(packed) == data  # what RQ's Job.restore does
    assert len(packed) <= len(zlib.compress(data)) * 1.01 + 8


def test_storing_still_works_after_redis_forgets_the_store_script(
        make_site: Callable[..., Path], redis_client: redis.Redis) -> None:
    """A restarted Redis has an empty script cache: the store (one Lua call) loads its script again
    instead of failing the 202 with NOSCRIPT."""
    site = make_site({**SITE, "bgfn.toml": BGFN_TOML})
    _, registry = load(site)
    queue = make_queue(redis_client, "parity")
    function = registry.functions["plain-background"]
    first = enqueue_invocation(queue, function, {"n": 1}, "bbbbbbbb-2222-4333-8444-555555555555")
    redis_client.script_flush()
    second = enqueue_invocation(queue, function, {"n": 2}, "cccccccc-2222-4333-8444-555555555555")
    assert queue.job_ids == [first, second]
    assert redis_client.hget(WAITING_KEY, "plain-background") == b"2"


@contextmanager
def _reply_dropping_proxy(redis_url: str) -> Iterator[str]:
    """A TCP proxy to Redis that passes every command on but, once a script call (EVAL/EVALSHA) has
    gone through, hangs up on the client instead of passing its reply: the write happened, and the
    client never hears so."""
    host, port = redis_url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    listener = socket.create_server(("127.0.0.1", 0))
    sockets: list[socket.socket] = [listener]

    def serve(client: socket.socket) -> None:
        upstream = socket.create_connection((host, int(port)))
        sockets.append(upstream)
        script_sent = threading.Event()

        def replies() -> None:
            while data := upstream.recv(65536):
                if script_sent.is_set():
                    client.shutdown(socket.SHUT_RDWR)
                    return
                client.sendall(data)

        threading.Thread(target=replies, daemon=True).start()
        try:
            while data := client.recv(65536):
                if b"EVAL" in data.upper():
                    script_sent.set()
                upstream.sendall(data)
        except OSError:
            pass

    def accept() -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            sockets.append(client)
            threading.Thread(target=serve, args=(client,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    finally:
        for sock in sockets:
            sock.close()


def test_a_store_whose_reply_is_lost_is_not_sent_again(
        make_site: Callable[..., Path], redis_url: str, redis_client: redis.Redis) -> None:
    """Redis ran the store but the reply never came back: the store fails (the web answers 503: it
    cannot know), and the job is in the queue once. A store sent again on a lost reply (a retrying
    client) would queue it twice, and the function would run twice."""
    site = make_site({**SITE, "bgfn.toml": BGFN_TOML})
    _, registry = load(site)
    function = registry.functions["plain-background"]
    queue = make_queue(redis_client, "parity")
    first = enqueue_invocation(queue, function, {"n": 1}, "aaaaaaaa-2222-4333-8444-555555555555")  # script cached
    with _reply_dropping_proxy(redis_url) as proxied:
        client = connect(proxied)
        try:
            with pytest.raises(QueueUnavailable, match="Redis did not take the job"):
                enqueue_invocation(make_queue(client, "parity"), function, {"n": 2},
                                   "dddddddd-2222-4333-8444-555555555555")
        finally:
            client.close()
    assert queue.job_ids == [first, "dddddddd-2222-4333-8444-555555555555"]
    assert redis_client.hget(WAITING_KEY, "plain-background") == b"2"
