"""Crash safety (issue "Background jobs you can see, steer and trust", point 5), with real
`bgfn worker` processes: a worker killed mid-job (SIGKILL to its whole process group) has its job
run again as a new attempt within about 2 x BGFN_LOST_JOB_TIMEOUT + the retry delay; SIGTERM
lets the running job finish within BGFN_SHUTDOWN_GRACE or hands it back to the front of the queue;
a Redis restart under load loses no invocation that was answered 202."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from flask.testing import FlaskClient
from rq import Queue, Worker
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from bgfn import defaults, jobs
from bgfn.redis_server import RedisServer
from tests.helpers import HttpResult, Process, bgfn_command, bgfn_env, http, wait_for

LOST = 3  # BGFN_LOST_JOB_TIMEOUT of these tests: heartbeat every 1 s, lost-job sweep every 1 s
# Bound on re-running a lost job: 2 x BGFN_LOST_JOB_TIMEOUT + retry delay (0), plus slack for a
# loaded 2-core machine.
RERUN_BOUND = 2 * LOST + 0
SLACK = 10.0

# Each start appends "<time> <pid of the worker that forked the horse>" to $MARK_DIR/<request id>;
# a finished run appends "done <time>" to $MARK_DIR/<request id>.done.
MARK = """
    import os, pathlib, time
    def mark(context):
        path = pathlib.Path(os.environ["MARK_DIR"], context.aws_request_id)
        with open(path, "a") as file:
            file.write(f"{time.time()!r} {os.getppid()}\\n")
        return len(path.read_text().splitlines())
    def done(context):
        with open(pathlib.Path(os.environ["MARK_DIR"], context.aws_request_id + ".done"), "a") as file:
            file.write(f"done {time.time()!r}\\n")
"""

SITE = {
    "functions/_shared/mark.py": MARK,
    # The first attempt hangs (until killed); later attempts finish at once.
    "functions/hang-once-background.py": """
        import time
        from _shared.mark import mark, done
        config = {"retry_delays": [0]}
        def handler(event, context):
            if mark(context) == 1:
                time.sleep(120)
            done(context)
    """,
    # Always hangs; no retries at all.
    "functions/hang-background.py": """
        import time
        from _shared.mark import mark, done
        config = {"max_attempts": 1}
        def handler(event, context):
            mark(context)
            time.sleep(120)
            done(context)
    """,
    # Takes a moment, then finishes.
    "functions/slow-background.py": """
        import time
        from _shared.mark import mark, done
        def handler(event, context):
            mark(context)
            time.sleep(2)
            done(context)
    """,
    # Keeps the worker busy (mid-job) most of the time under load. A job its worker held when Redis went
    # away is a lost job: retried as a failed attempt after its retry delay (1 s here, not Netlify's 60 s,
    # so the test's wait covers it).
    "functions/load-background.py": """
        import time
        from _shared.mark import mark, done
        config = {"retry_delays": [1, 1]}
        def handler(event, context):
            mark(context)
            time.sleep(0.1)
            done(context)
    """,
    "functions/mark-background.py": """
        from _shared.mark import mark, done
        def handler(event, context):
            mark(context)
            done(context)
    """,
}


@pytest.fixture
def site(make_site: Callable[..., Path]) -> Path:
    return make_site(SITE)


def starts(marks: Path, job_id: str) -> list[tuple[float, int]]:
    """(time, worker pid) of each start of the job."""
    path = marks / job_id
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines():
        when, pid = line.split()
        found.append((float(when), int(pid)))
    return found


def finished(marks: Path, job_id: str) -> bool:
    return (marks / f"{job_id}.done").exists()


def fetch(redis_client: redis.Redis, job_id: str) -> Job:
    return Job.fetch(job_id, connection=redis_client, serializer=JSONSerializer)


def accept(client: FlaskClient, name: str) -> str:
    response = client.post(f"/.netlify/functions/{name}")
    assert response.status_code == 202, response.data
    return str(response.headers["X-Bgfn-Job-Id"])


def status(redis_client: redis.Redis, job_id: str) -> JobStatus | None:
    return fetch(redis_client, job_id).get_status()


def crash_env(marks: Path, **extra: str) -> dict[str, str]:
    return {"MARK_DIR": str(marks), "BGFN_LOST_JOB_TIMEOUT": str(LOST), **extra}


def worker_registered(redis_client: redis.Redis, process: Process) -> bool:
    """Whether `process` (a `bgfn worker` with one RQ worker) is listening for jobs."""
    if not process.alive():
        raise AssertionError(f"the worker exited: {process.output()}")
    return any(w.pid == process.pid for w in Worker.all(connection=redis_client))


def kill_group(process: Process) -> None:
    """SIGKILL the worker and its work horse, as a crashed container would."""
    children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True, check=False)
    horse_pids = [int(p) for p in children.stdout.split()]
    os.killpg(process.pid, signal.SIGKILL)
    for pid in horse_pids:  # the horse is in a process group of its own (RQ's setpgrp)
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    wait_for(lambda: not process.alive(), timeout=10, what="the killed worker to be reaped")


def test_killed_worker_job_reruns_on_a_second_worker_within_the_bound(
        site: Path, make_client: Callable[..., FlaskClient], start_worker: Callable[..., Process],
        redis_client: redis.Redis, marks: Path) -> None:
    client = make_client(site)
    first = start_worker(site, **crash_env(marks))
    wait_for(lambda: worker_registered(redis_client, first), timeout=30, what="the first worker")
    second = start_worker(site, **crash_env(marks))
    wait_for(lambda: worker_registered(redis_client, second), timeout=30, what="the second worker")
    job_id = accept(client, "hang-once-background")

    wait_for(lambda: starts(marks, job_id), timeout=20, what="the first attempt to start")
    victim = first if starts(marks, job_id)[0][1] == first.pid else second
    survivor = second if victim is first else first
    assert status(redis_client, job_id) == JobStatus.STARTED
    kill_group(victim)
    killed_at = time.time()

    wait_for(lambda: len(starts(marks, job_id)) >= 2, timeout=RERUN_BOUND + SLACK,
             what="the lost job to run again")
    rerun_at, rerun_by = starts(marks, job_id)[1]
    print(f"lost job re-ran {rerun_at - killed_at:.2f} s after the kill (bound {RERUN_BOUND} s)")
    assert rerun_by == survivor.pid
    assert rerun_at - killed_at < RERUN_BOUND + SLACK

    wait_for(lambda: status(redis_client, job_id) == JobStatus.FINISHED, timeout=15,
             what="the second attempt to succeed")
    job = fetch(redis_client, job_id)
    assert job.meta["attempts"] == 2  # the killed run counted as an attempt
    assert not job.retries_left
    assert len(starts(marks, job_id)) == 2
    assert survivor.alive()


def test_killed_worker_job_reruns_on_a_restarted_worker(
        site: Path, make_client: Callable[..., FlaskClient], start_worker: Callable[..., Process],
        redis_client: redis.Redis, marks: Path) -> None:
    client = make_client(site)
    worker = start_worker(site, **crash_env(marks))
    job_id = accept(client, "hang-once-background")
    wait_for(lambda: starts(marks, job_id), timeout=30, what="the first attempt to start")

    kill_group(worker)
    killed_at = time.time()
    assert status(redis_client, job_id) == JobStatus.STARTED  # nobody is left to notice yet
    restarted = start_worker(site, **crash_env(marks))

    wait_for(lambda: len(starts(marks, job_id)) >= 2, timeout=RERUN_BOUND + SLACK + 5,
             what="the lost job to run again")
    rerun_at, rerun_by = starts(marks, job_id)[1]
    print(f"lost job re-ran {rerun_at - killed_at:.2f} s after the kill on a restarted worker")
    assert rerun_by == restarted.pid
    wait_for(lambda: status(redis_client, job_id) == JobStatus.FINISHED, timeout=15,
             what="the second attempt to succeed")
    assert fetch(redis_client, job_id).meta["attempts"] == 2


def test_killed_worker_job_without_retries_fails_instead_of_staying_started(
        site: Path, make_client: Callable[..., FlaskClient], start_worker: Callable[..., Process],
        redis_client: redis.Redis, marks: Path) -> None:
    client = make_client(site)
    worker = start_worker(site, **crash_env(marks))
    job_id = accept(client, "hang-background")  # max_attempts = 1
    wait_for(lambda: starts(marks, job_id), timeout=30, what="the attempt to start")
    kill_group(worker)
    killed_at = time.time()
    start_worker(site, **crash_env(marks))

    wait_for(lambda: status(redis_client, job_id) == JobStatus.FAILED, timeout=RERUN_BOUND + SLACK + 5,
             what="the lost job to be failed")
    print(f"lost job without retries failed {time.time() - killed_at:.2f} s after the kill")
    view = jobs.view(fetch(redis_client, job_id))
    assert view["state"] == "failed"
    assert view["attempts"] == 1
    assert view["error"] is not None and view["error"]["type"] == "WorkerLost", view["error"]
    assert len(starts(marks, job_id)) == 1 and not finished(marks, job_id)


def test_sigterm_lets_the_running_job_finish_within_the_grace(
        site: Path, make_client: Callable[..., FlaskClient], start_worker: Callable[..., Process],
        redis_client: redis.Redis, marks: Path) -> None:
    client = make_client(site)
    worker = start_worker(site, **crash_env(marks, BGFN_SHUTDOWN_GRACE="20"))
    job_id = accept(client, "slow-background")  # runs 2 s
    wait_for(lambda: starts(marks, job_id), timeout=30, what="the job to start")

    worker.signal(signal.SIGTERM)
    signaled_at = time.time()
    later_id = accept(client, "mark-background")  # arrives while the worker is stopping

    wait_for(lambda: not worker.alive(), timeout=20 + SLACK, what="the worker to exit")
    exited_after = time.time() - signaled_at
    print(f"worker exited {exited_after:.2f} s after SIGTERM (job ran 2 s, grace 20 s)")
    assert worker.popen.returncode == 0, worker.output()
    assert exited_after < 20
    job = fetch(redis_client, job_id)
    assert job.get_status() == JobStatus.FINISHED
    assert finished(marks, job_id)
    assert job.meta["attempts"] == 1 and "handed_back" not in job.meta
    # The stopping worker took no new job.
    assert fetch(redis_client, later_id).get_status() == JobStatus.QUEUED
    assert not starts(marks, later_id)


def test_sigterm_hands_an_overrunning_job_back_to_the_front_of_the_queue(
        site: Path, make_client: Callable[..., FlaskClient], start_worker: Callable[..., Process],
        redis_client: redis.Redis, marks: Path) -> None:
    client = make_client(site)
    grace = 2
    worker = start_worker(site, **crash_env(marks, BGFN_SHUTDOWN_GRACE=str(grace)))
    job_id = accept(client, "hang-once-background")
    wait_for(lambda: starts(marks, job_id), timeout=30, what="the job to start")
    behind_id = accept(client, "mark-background")  # queued behind the running job

    worker.signal(signal.SIGTERM)
    signaled_at = time.time()
    wait_for(lambda: not worker.alive(), timeout=grace + SLACK, what="the worker to exit")
    exited_after = time.time() - signaled_at
    print(f"worker handed its job back and exited {exited_after:.2f} s after SIGTERM (grace {grace} s)")
    assert exited_after >= grace
    assert worker.popen.returncode == 0, worker.output()

    job = fetch(redis_client, job_id)
    assert job.get_status() == JobStatus.QUEUED
    queue = Queue(defaults.QUEUE, connection=redis_client, serializer=JSONSerializer)
    assert queue.get_job_ids() == [job_id, behind_id]  # at the front
    assert job.meta["attempts"] == 0  # a run cut short is not an attempt
    assert job.meta["handed_back"] == 1
    assert job.retries_left == 1  # untouched
    assert not finished(marks, job_id)
    assert job_id not in StartedJobRegistry(queue=queue).get_job_ids()

    # Another worker runs it (first), as a first attempt.
    other = start_worker(site, **crash_env(marks))
    wait_for(lambda: status(redis_client, job_id) == JobStatus.FINISHED, timeout=30,
             what="the handed-back job to run on another worker")
    assert starts(marks, job_id)[1][1] == other.pid
    assert fetch(redis_client, job_id).meta["attempts"] == 1
    wait_for(lambda: status(redis_client, behind_id) == JobStatus.FINISHED, timeout=15,
             what="the job behind it")
    assert starts(marks, job_id)[1][0] <= starts(marks, behind_id)[0][0]


def test_a_job_taken_off_the_queue_but_never_started_goes_back_without_losing_an_attempt(
        site: Path, make_client: Callable[..., FlaskClient], start_worker: Callable[..., Process],
        redis_client: redis.Redis, marks: Path) -> None:
    # RQ dequeues by moving the job id to an intermediate list; when Redis goes away mid-dequeue (the
    # move done, its reply lost) or the worker dies right after, the job sits there, started by no one.
    client = make_client(site)
    job_id = accept(client, "mark-background")
    assert redis_client.lmove("rq:queue:bgfn", "rq:queue:bgfn:intermediate", "LEFT", "RIGHT") == job_id.encode()
    stranded_at = time.time()

    worker = start_worker(site, **crash_env(marks))
    # The handler's done-mark comes before the worker records the outcome: wait for the status.
    wait_for(lambda: status(redis_client, job_id) == JobStatus.FINISHED, timeout=RERUN_BOUND + SLACK,
             what=f"the stranded job to run: {worker.output()}")
    assert finished(marks, job_id)
    ran_after = starts(marks, job_id)[0][0] - stranded_at
    print(f"stranded job ran {ran_after:.2f} s after it was taken off the queue (bound {LOST} s + sweeps)")
    assert ran_after < RERUN_BOUND + SLACK  # RQ's own cleanup: over a minute, and a failed attempt
    job = fetch(redis_client, job_id)
    assert job.meta["attempts"] == 1  # nothing had run: no attempt lost
    assert redis_client.llen("rq:queue:bgfn:intermediate") == 0


def test_redis_restart_under_load_loses_no_accepted_invocation(
        site: Path, start_server: Callable[..., str], processes: list[Process], tmp_path: Path,
        marks: Path) -> None:
    # Our own Redis (never the shared session one), persisted with the append-only file.
    data_dir = tmp_path / "own-redis"
    server = RedisServer(data_dir)
    server.start()
    try:
        base = start_server(site, REDIS_URL=server.url)
        worker = Process(bgfn_command(site, "worker"),
                         bgfn_env(REDIS_URL=server.url, **crash_env(marks)), tmp_path / "restart-worker.log")
        processes.append(worker)
        own_client = redis.Redis.from_url(server.url)
        wait_for(lambda: worker_registered(own_client, worker), timeout=30, what="the worker to listen")
        own_client.close()

        answers: list[tuple[float, HttpResult | BaseException]] = []
        stop = threading.Event()

        def burst() -> None:
            while not stop.is_set():
                try:
                    answers.append((time.time(), http(base, "POST", "/.netlify/functions/load-background",
                                                      b"load", timeout=30)))
                except OSError as exc:
                    answers.append((time.time(), exc))
                time.sleep(0.01)

        def count(code: int) -> int:
            return sum(1 for _, a in answers if isinstance(a, HttpResult) and a.status == code)

        sender = threading.Thread(target=burst, daemon=True)
        sender.start()
        try:
            wait_for(lambda: count(202) >= 20, timeout=30, what="202s before the restart")
            server.stop()  # SIGTERM: Valkey flushes the append-only file
            wait_for(lambda: count(503) >= 3, timeout=30, what="503s while Redis is down")
            accepted_before = count(202)
            server = RedisServer(data_dir, port=server.port)
            server.start()
            wait_for(lambda: count(202) >= accepted_before + 20, timeout=60, what="202s after the restart")
        finally:
            stop.set()
            sender.join(timeout=60)
        assert not sender.is_alive()

        results = [a for _, a in answers if isinstance(a, HttpResult)]
        errors = [a for _, a in answers if not isinstance(a, HttpResult)]
        assert not errors, errors[:3]  # the web answered every request
        assert {r.status for r in results} <= {202, 503}, sorted({(r.status, r.text[:200]) for r in results})
        for refused in (r for r in results if r.status == 503):
            assert refused.header("Retry-After") == str(defaults.RETRY_AFTER)
            assert refused.header("X-Bgfn-Job-Id") is None
        accepted = [r.header("X-Bgfn-Job-Id") for r in results if r.status == 202]
        assert all(accepted)
        print(f"{len(accepted)} accepted, {count(503)} refused with 503 during the restart")

        def missing() -> list[str]:
            return [j for j in accepted if j and not finished(marks, j)]

        wait_for(lambda: not missing(), timeout=60, interval=0.2,
                 what=f"every accepted job to run (worker log: {tmp_path / 'restart-worker.log'})")
        assert all(len(starts(marks, j)) >= 1 for j in accepted if j)
        # Both recovered without a restart.
        assert worker.alive(), worker.output()
        assert http(base, "GET", "/.bgfn/ready").status == 200
    finally:
        server.stop()
