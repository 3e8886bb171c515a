"""`bgfn worker` as a real process (CONTRACT §6, §7): retries, the hard time limit, killed
workers, unknown functions, and refusing to start on a broken site or without Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from flask.testing import FlaskClient
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from bgfn import defaults
from tests.conftest import run_worker_burst
from tests.helpers import Process, bgfn_command, bgfn_env, http, wait_for

# Each function appends "<time.time()>\n" to $MARK_DIR/<request id> when it starts.
MARK = """
    import os, pathlib, time
    def mark(context, suffix=""):
        path = pathlib.Path(os.environ["MARK_DIR"], context.aws_request_id + suffix)
        with open(path, "a") as file:
            file.write(f"{time.time()!r}\\n")
"""

SITE = {
    "functions/_shared/mark.py": MARK,
    "functions/mark-background.py": """
        from _shared.mark import mark
        def handler(event, context):
            mark(context)
            return {"statusCode": 200}
    """,
    "functions/fail-background.py": """
        from _shared.mark import mark
        def handler(event, context):
            mark(context)
            raise RuntimeError("boom from the handler")
    """,
    "functions/status500-background.py": """
        from _shared.mark import mark
        def handler(event, context):
            mark(context)
            return {"statusCode": 500, "body": "failed, but by status code"}
    """,
    "functions/stuck-background.py": """
        import time
        from _shared.mark import mark
        def handler(event, context):
            mark(context)
            time.sleep(120)
            mark(context, ".done")
    """,
    "functions/spin-background.py": """
        from _shared.mark import mark
        config = {"timeout": 1}
        def handler(event, context):
            mark(context)
            while True:  # stuck in pure Python, never sleeping
                pass
    """,
    "functions/pid-background.py": """
        import os, pathlib
        def handler(event, context):
            pathlib.Path(os.environ["MARK_DIR"], context.aws_request_id + ".pid").write_text(
                f"{os.getpid()} {os.getppid()}")
    """,
    "functions/stubborn-background.py": """
        from _shared.mark import mark
        config = {"timeout": 1}
        def handler(event, context):
            mark(context)
            try:
                while True:
                    pass
            except Exception:  # swallows the first timeout, as careless retry loops do
                mark(context, ".swallowed")
            while True:
                pass
    """,
    "functions/deaf-background.py": """
        import os, pathlib, signal, time
        from _shared.mark import mark
        config = {"timeout": 1}
        def handler(event, context):
            # Stuck where the horse's own alarm cannot reach, as in a long C call.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            pathlib.Path(os.environ["MARK_DIR"], context.aws_request_id + ".pid").write_text(
                f"{os.getpid()} {os.getppid()}")
            mark(context)
            time.sleep(120)
            mark(context, ".done")
    """,
    "functions/crash-background.py": """
        import os, pathlib
        from _shared.mark import mark
        def handler(event, context):
            pathlib.Path(os.environ["MARK_DIR"], context.aws_request_id + ".pid").write_text(
                f"{os.getpid()} {os.getppid()}")
            mark(context)
            os._exit(3)
    """,
    "functions/hello.py": """
        def handler(event, context):
            return {"statusCode": 200, "body": "hello"}
    """,
}


@pytest.fixture
def site(make_site: Callable[..., Path]) -> Path:
    return make_site(SITE)


def fetch(redis_client: redis.Redis, job_id: str) -> Job:
    return Job.fetch(job_id, connection=redis_client, serializer=JSONSerializer)


def accept(client: FlaskClient, name: str) -> str:
    response = client.post(f"/.netlify/functions/{name}")
    assert response.status_code == 202, response.data
    job_id = response.headers["X-Bgfn-Job-Id"]
    assert job_id
    return job_id


def wait_status(redis_client: redis.Redis, job_id: str, status: JobStatus, timeout: float = 15.0,
                worker: Process | None = None) -> Job:
    def reached() -> Job | None:
        if worker is not None and not worker.alive():
            raise AssertionError(f"the worker exited: {worker.output()}")
        job = fetch(redis_client, job_id)
        # The status of this same read (get_status() would read it again, newer than the other fields:
        # a job seen `failed` could then still lack the ended_at written with that status).
        return job if job.get_status(refresh=False) == status else None

    return wait_for(reached, timeout=timeout, what=f"job {job_id} to be {status}")


def failure(job: Job) -> str:
    """The error text of the job's last run ('' when it did not fail)."""
    result = job.latest_result()
    return (result.exc_string or "") if result is not None else ""


def attempts(marks: Path, job_id: str, suffix: str = "") -> list[float]:
    path = marks / (job_id + suffix)
    if not path.exists():
        return []
    return [float(line) for line in path.read_text().splitlines() if line.strip()]


def horse_of(marks: Path, job_id: str) -> tuple[int, int]:
    """(pid, parent pid) of the process that ran the job's handler."""
    pid, parent = (marks / (job_id + ".pid")).read_text().split()
    return int(pid), int(parent)


def test_one_work_horse_runs_job_after_job_and_is_renewed_after_its_quota(
        site: Path, make_client: Callable[..., FlaskClient], start_worker: Callable[..., Process],
        redis_client: redis.Redis, marks: Path) -> None:
    client = make_client(site)
    worker = start_worker(site, MARK_DIR=str(marks), BGFN_HORSE_MAX_JOBS="3")
    ids = [accept(client, "pid-background") for _ in range(5)]
    for job_id in ids:
        wait_status(redis_client, job_id, JobStatus.FINISHED, worker=worker)
    horses = [horse_of(marks, job_id) for job_id in ids]
    assert {parent for _, parent in horses} == {worker.pid}  # run in children of the worker
    pids = [pid for pid, _ in horses]
    assert worker.pid not in pids
    assert pids[0] == pids[1] == pids[2], pids  # one horse for three jobs, not a fork each
    assert pids[3] == pids[4] != pids[0], pids  # then a fresh one
    assert not any(Path(f"/proc/{pid}").exists() for pid in set(pids[:3]))  # the spent horse was reaped


def test_a_stopping_worker_ends_its_idle_work_horse(
        site: Path, make_client: Callable[..., FlaskClient], start_worker: Callable[..., Process],
        redis_client: redis.Redis, marks: Path) -> None:
    client = make_client(site)
    worker = start_worker(site, MARK_DIR=str(marks))
    job_id = accept(client, "pid-background")
    wait_status(redis_client, job_id, JobStatus.FINISHED, worker=worker)
    horse_pid, _ = horse_of(marks, job_id)
    assert Path(f"/proc/{horse_pid}").exists()  # kept between jobs

    worker.signal(signal.SIGTERM)
    wait_for(lambda: not worker.alive(), timeout=20, what="the worker to stop")
    assert worker.popen.returncode == 0, worker.output()
    assert not Path(f"/proc/{horse_pid}").exists()  # no horse left behind waiting for orders


def test_a_handler_deaf_to_the_alarm_is_killed_by_the_worker(
        site: Path, make_client: Callable[..., FlaskClient], start_worker: Callable[..., Process],
        redis_client: redis.Redis, marks: Path) -> None:
    client = make_client(site, retry_delays=())
    worker = start_worker(site, MARK_DIR=str(marks))
    job_id = accept(client, "deaf-background")  # config timeout 1 s, SIGALRM blocked

    job = wait_status(redis_client, job_id, JobStatus.FAILED, timeout=30, worker=worker)
    ran = time.time() - attempts(marks, job_id)[0]
    # Killed HORSE_KILL_GRACE after the 1 s limit (counted by the worker from just before the handler started).
    assert 1 + defaults.HORSE_KILL_GRACE - 0.5 <= ran < 1 + defaults.HORSE_KILL_GRACE + 10, ran
    assert "killed its work horse" in failure(job)
    assert job.meta["error"]["type"] == "TimeoutError"
    assert not attempts(marks, job_id, ".done")
    deaf_pid, _ = horse_of(marks, job_id)
    assert not Path(f"/proc/{deaf_pid}").exists()

    # The next job runs, in a fresh horse.
    next_id = accept(client, "pid-background")
    wait_status(redis_client, next_id, JobStatus.FINISHED, worker=worker)
    assert horse_of(marks, next_id)[0] != deaf_pid


def test_a_crashing_handler_fails_its_attempt_and_the_next_job_gets_a_fresh_horse(
        site: Path, make_client: Callable[..., FlaskClient], start_worker: Callable[..., Process],
        redis_client: redis.Redis, marks: Path) -> None:
    client = make_client(site, retry_delays=(1,))
    worker = start_worker(site, MARK_DIR=str(marks), BGFN_RETRY_DELAYS="1")
    job_id = accept(client, "crash-background")

    job = wait_status(redis_client, job_id, JobStatus.FAILED, timeout=30, worker=worker)
    assert len(attempts(marks, job_id)) == 2  # the crash counted as an attempt, and was retried
    assert "exit status 3" in failure(job)
    assert job.meta["error"]["type"] == "WorkerCrash"
    crashed_pid, _ = horse_of(marks, job_id)

    next_id = accept(client, "pid-background")
    wait_status(redis_client, next_id, JobStatus.FINISHED, worker=worker)
    assert horse_of(marks, next_id)[0] != crashed_pid


def test_a_killed_worker_takes_its_work_horse_with_it(
        site: Path, make_client: Callable[..., FlaskClient], start_worker: Callable[..., Process],
        redis_client: redis.Redis, marks: Path) -> None:
    client = make_client(site)
    worker = start_worker(site, MARK_DIR=str(marks))
    job_id = accept(client, "deaf-background")
    wait_for(lambda: attempts(marks, job_id), timeout=15, what="the handler to start")
    horse_pid, _ = horse_of(marks, job_id)

    os.kill(worker.pid, signal.SIGKILL)  # the worker only: the horse has a process group of its own
    wait_for(lambda: not worker.alive(), timeout=10, what="the worker to die")
    # An orphaned horse would run on unseen while the lost-job sweep runs the job again elsewhere.
    wait_for(lambda: not Path(f"/proc/{horse_pid}").exists() or
             Path(f"/proc/{horse_pid}/stat").read_text().split()[2] == "Z",
             timeout=10, what="the work horse to die with its worker")


def test_raised_error_is_retried_after_the_configured_delays(
        site: Path, make_client: Callable[..., FlaskClient], start_worker: Callable[..., Process],
        redis_client: redis.Redis, marks: Path) -> None:
    client = make_client(site, retry_delays=(1, 2))
    worker = start_worker(site, MARK_DIR=str(marks), BGFN_RETRY_DELAYS="1,2")
    job_id = accept(client, "fail-background")

    job = wait_status(redis_client, job_id, JobStatus.FAILED, timeout=30, worker=worker)
    times = attempts(marks, job_id)
    assert len(times) == 3, times  # the first run and two retries
    first_gap, second_gap = times[1] - times[0], times[2] - times[1]
    assert 1.0 <= first_gap < 1.0 + 3.0, times
    assert 2.0 <= second_gap < 2.0 + 3.0, times
    assert not job.retries_left
    assert "boom from the handler" in failure(job)
    assert worker.alive()


def test_returned_500_is_not_retried(site: Path, make_client: Callable[..., FlaskClient], redis_url: str,
                                    redis_client: redis.Redis, marks: Path) -> None:
    client = make_client(site, retry_delays=(1, 2))
    job_id = accept(client, "status500-background")
    run_worker_burst(site, redis_url, MARK_DIR=str(marks), BGFN_RETRY_DELAYS="1,2")

    job = fetch(redis_client, job_id)
    assert job.get_status() == JobStatus.FINISHED
    assert job.retries_left == 2  # untouched: no retry was scheduled
    assert job.return_value() == {"statusCode": 500, "body": "failed, but by status code"}
    assert len(attempts(marks, job_id)) == 1


def test_background_timeout_of_the_worker_kills_a_stuck_handler(
        site: Path, make_client: Callable[..., FlaskClient], start_worker: Callable[..., Process],
        redis_client: redis.Redis, marks: Path) -> None:
    # The web tier has the default 900 s; the worker's own limit is what it enforces.
    client = make_client(site, retry_delays=())
    worker = start_worker(site, MARK_DIR=str(marks), BGFN_BACKGROUND_TIMEOUT="2")
    job_id = accept(client, "stuck-background")

    wait_for(lambda: attempts(marks, job_id), timeout=15, what="the handler to start")
    started = attempts(marks, job_id)[0]
    job = wait_status(redis_client, job_id, JobStatus.FAILED, timeout=20, worker=worker)
    ended = time.time()
    assert 2.0 <= ended - started < 2.0 + 8.0
    assert "timeout" in failure(job).lower()
    assert not attempts(marks, job_id, ".done")

    # The worker survives the kill and runs the next job.
    next_id = accept(client, "mark-background")
    wait_status(redis_client, next_id, JobStatus.FINISHED, worker=worker)


def test_timeout_set_at_enqueue_kills_a_spinning_handler(
        site: Path, make_client: Callable[..., FlaskClient], start_worker: Callable[..., Process],
        redis_client: redis.Redis, marks: Path) -> None:
    client = make_client(site, retry_delays=(), background_timeout=2)
    worker = start_worker(site, MARK_DIR=str(marks))
    stuck_id = accept(client, "stuck-background")
    spin_id = accept(client, "spin-background")  # config = {"timeout": 1}

    job = wait_status(redis_client, stuck_id, JobStatus.FAILED, timeout=20, worker=worker)
    assert "timeout" in failure(job).lower()
    job = wait_status(redis_client, spin_id, JobStatus.FAILED, timeout=20, worker=worker)
    assert "timeout" in failure(job).lower()
    assert job.started_at is not None and job.ended_at is not None
    # By the horse's alarm at 1 s, or at worst by the worker's kill HORSE_KILL_GRACE later.
    assert (job.ended_at - job.started_at).total_seconds() < 1.0 + defaults.HORSE_KILL_GRACE + 3.0
    assert len(attempts(marks, spin_id)) == 1


def test_a_handler_that_swallows_the_timeout_gets_the_alarm_again(
        site: Path, make_client: Callable[..., FlaskClient], start_worker: Callable[..., Process],
        redis_client: redis.Redis, marks: Path) -> None:
    client = make_client(site, retry_delays=())
    worker = start_worker(site, MARK_DIR=str(marks))
    job_id = accept(client, "stubborn-background")  # config timeout 1 s; catches the first timeout

    job = wait_status(redis_client, job_id, JobStatus.FAILED, timeout=20, worker=worker)
    assert attempts(marks, job_id, ".swallowed")  # the first alarm was swallowed...
    assert "Task exceeded maximum timeout value" in failure(job)  # ...the next one stopped it
    assert "killed its work horse" not in failure(job)
    assert job.started_at is not None and job.ended_at is not None
    assert (job.ended_at - job.started_at).total_seconds() < 1.0 + defaults.HORSE_KILL_GRACE  # before the kill


def test_worker_killed_mid_job_leaves_the_web_server_answering(
        site: Path, start_server: Callable[..., str], start_worker: Callable[..., Process],
        redis_client: redis.Redis, marks: Path) -> None:
    base = start_server(site)
    worker = start_worker(site, MARK_DIR=str(marks))
    accepted = http(base, "POST", "/.netlify/functions/stuck-background")
    assert accepted.status == 202
    job_id = accepted.header("X-Bgfn-Job-Id")
    assert job_id
    wait_for(lambda: attempts(marks, job_id), timeout=15, what="the handler to start")

    os.killpg(worker.pid, signal.SIGKILL)  # the worker and its work horse
    wait_for(lambda: not worker.alive(), timeout=10, what="the worker to die")

    assert http(base, "GET", "/.bgfn/health").status == 200
    sync = http(base, "GET", "/.netlify/functions/hello")
    assert (sync.status, sync.body) == (200, b"hello")
    again = http(base, "POST", "/.netlify/functions/mark-background")
    assert again.status == 202
    again_id = again.header("X-Bgfn-Job-Id")
    assert again_id
    assert fetch(redis_client, again_id).get_status() == JobStatus.QUEUED

    # The job survives in Redis for the next worker.
    replacement = start_worker(site, MARK_DIR=str(marks))
    wait_status(redis_client, again_id, JobStatus.FINISHED, worker=replacement)
    assert len(attempts(marks, again_id)) == 1


def test_function_unknown_to_the_worker_fails_the_job_cleanly(
        site: Path, make_site: Callable[..., Path], make_client: Callable[..., FlaskClient], redis_url: str,
        redis_client: redis.Redis, marks: Path) -> None:
    web_site = make_site({**SITE, "functions/ghost-background.py": """
        def handler(event, context):
            return None
    """})
    client = make_client(web_site)
    ghost_id = accept(client, "ghost-background")
    known_id = accept(client, "mark-background")

    output = run_worker_burst(site, redis_url, MARK_DIR=str(marks))

    ghost = fetch(redis_client, ghost_id)
    assert ghost.get_status() == JobStatus.FAILED
    assert "ghost-background" in failure(ghost)
    assert "FunctionNotFound" in failure(ghost)
    # The worker went on to the next job.
    assert fetch(redis_client, known_id).get_status() == JobStatus.FINISHED
    assert len(attempts(marks, known_id)) == 1
    assert "ghost-background" in output


def test_several_worker_processes_run_jobs(
        site: Path, make_client: Callable[..., FlaskClient], start_worker: Callable[..., Process],
        redis_client: redis.Redis, marks: Path) -> None:
    client = make_client(site)
    worker = start_worker(site, "--processes", "2", MARK_DIR=str(marks))
    ids = [accept(client, "mark-background") for _ in range(4)]
    for job_id in ids:
        wait_status(redis_client, job_id, JobStatus.FINISHED, timeout=20, worker=worker)
        assert len(attempts(marks, job_id)) == 1


def test_worker_refuses_a_function_with_a_syntax_error(make_site: Callable[..., Path], redis_url: str) -> None:
    site = make_site({**SITE, "functions/broken-background.py": "def handler(event, context:\n    pass\n"})
    done = subprocess.run(bgfn_command(site, "worker", "--burst"), env=bgfn_env(REDIS_URL=redis_url),
                          capture_output=True, text=True, timeout=30)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "broken-background.py" in output
    assert "syntax" in output.lower()
    assert "line 1" in output
    assert "Traceback (most recent call last)" not in output  # a message, not a crash


def test_worker_refuses_to_start_without_redis_url(site: Path) -> None:
    done = subprocess.run(bgfn_command(site, "worker", "--burst"), env=bgfn_env(), capture_output=True,
                          text=True, timeout=30)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "REDIS_URL is not set" in output
    assert "Traceback (most recent call last)" not in output
