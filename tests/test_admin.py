"""Steering jobs (issue "Background jobs you can see, steer and trust", point 3): `bgfn jobs` (list,
show, retry, purge) and the same under /.bgfn/admin/ behind BGFN_ADMIN_TOKEN. Jobs fail on real
workers, show up as failed, are replayed and succeed the second time."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner, Result
from flask.testing import FlaskClient
from rq.job import Job
from rq.serializers import JSONSerializer

from bgfn.cli import main
from tests.conftest import run_worker_burst
from tests.helpers import Process, http, wait_for

TOKEN = "admin-token-0123456789-abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

MARK = """
    import os, pathlib, time
    def mark(context, suffix=""):
        with open(pathlib.Path(os.environ["MARK_DIR"], context.aws_request_id + suffix), "a") as file:
            file.write(f"{time.time()!r}\\n")
"""

SITE = {
    "functions/_shared/mark.py": MARK,
    # Fails while $MARK_DIR/broken exists.
    "functions/flaky-background.py": """
        import os, pathlib
        from _shared.mark import mark
        config = {"max_attempts": 1}
        def handler(event, context):
            mark(context)
            if pathlib.Path(os.environ["MARK_DIR"], "broken").exists():
                raise RuntimeError("the disk is broken")
            return {"fixed": True}
    """,
    "functions/other-background.py": """
        from _shared.mark import mark
        config = {"max_attempts": 1}
        def handler(event, context):
            mark(context)
            raise KeyError("always")
    """,
    "functions/ok-background.py": """
        from _shared.mark import mark
        def handler(event, context):
            mark(context)
            return "ok"
    """,
    "functions/block-background.py": """
        import time
        from _shared.mark import mark
        config = {"max_attempts": 1}
        def handler(event, context):
            mark(context)
            time.sleep(60)
    """,
}


@pytest.fixture
def site(make_site: Callable[..., Path]) -> Path:
    return make_site(SITE)


@pytest.fixture
def marks(tmp_path: Path) -> Path:
    path = tmp_path / "marks"
    path.mkdir()
    (path / "broken").touch()
    return path


@pytest.fixture
def admin(site: Path, make_client: Callable[..., FlaskClient]) -> FlaskClient:
    return make_client(site, admin_token=TOKEN)


def marked(marks: Path, job_id: str) -> int:
    path = marks / job_id
    return len(path.read_text().split()) if path.exists() else 0


def accept(client: FlaskClient, name: str) -> str:
    response = client.post(f"/.netlify/functions/{name}")
    assert response.status_code == 202, response.data
    return str(response.headers["X-Bgfn-Job-Id"])


def status(client: FlaskClient, job_id: str) -> dict[str, Any]:
    response = client.get(f"/.bgfn/jobs/{job_id}")
    assert response.status_code == 200, response.data
    return dict(response.get_json())


def listed(client: FlaskClient, query: str = "") -> list[dict[str, Any]]:
    response = client.get(f"/.bgfn/admin/jobs{query}", headers=AUTH)
    assert response.status_code == 200, response.data
    return list(response.get_json()["jobs"])


def cli(redis_url: str | None, *args: str) -> Result:
    group = ["jobs", "--redis-url", redis_url] if redis_url else ["jobs"]
    return CliRunner().invoke(main, [*group, *args], catch_exceptions=False)


# --- authorization -------------------------------------------------------------------------------

ENDPOINTS = [
    ("GET", "/.bgfn/admin/jobs"),
    ("GET", "/.bgfn/admin/jobs/00000000-0000-4000-8000-000000000000"),
    ("POST", "/.bgfn/admin/jobs/00000000-0000-4000-8000-000000000000/retry"),
    ("POST", "/.bgfn/admin/jobs/retry?function=flaky-background"),
    ("POST", "/.bgfn/admin/jobs/purge"),
]


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
def test_admin_endpoints_do_not_exist_without_a_token(
        site: Path, make_client: Callable[..., FlaskClient], method: str, path: str) -> None:
    client = make_client(site)
    for headers in ({}, AUTH):
        response = client.open(path, method=method, headers=headers)
        assert response.status_code == 404, response.data
        assert response.mimetype == "application/json"
        assert "BGFN_ADMIN_TOKEN" in response.get_json()["errorMessage"]


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
def test_admin_endpoints_want_the_right_bearer_token(admin: FlaskClient, method: str, path: str) -> None:
    for authorization in (None, "Bearer wrong-token-0123456789", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer"):
        headers = {"Authorization": authorization} if authorization is not None else {}
        response = admin.open(path, method=method, headers=headers)
        assert response.status_code == 401, (authorization, response.data)
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="bgfn"'
        assert response.get_json()["errorType"] == "Unauthorized"
    response = admin.open(path, method=method, headers=AUTH)
    # Past the check: an answer about the (absent) job, never an authorization error.
    assert response.status_code in (200, 404), response.data
    assert response.status_code == (404 if "0000-4000" in path else 200)
    assert "WWW-Authenticate" not in response.headers
    if response.status_code == 404:
        assert response.get_json()["errorType"] == "JobNotFound"


# --- over HTTP -----------------------------------------------------------------------------------

def test_admin_lists_jobs_by_state_and_function(admin: FlaskClient, site: Path, redis_url: str,
                                                marks: Path) -> None:
    first_ok, second_ok, flaky = accept(admin, "ok-background"), accept(admin, "ok-background"), \
        accept(admin, "flaky-background")
    run_worker_burst(site, redis_url, MARK_DIR=str(marks))
    waiting = accept(admin, "ok-background")

    everything = {job["id"]: job for job in listed(admin)}
    assert set(everything) == {first_ok, second_ok, flaky, waiting}
    assert everything[flaky]["state"] == "failed"
    assert everything[flaky]["error"] == {"type": "RuntimeError", "message": "the disk is broken"}
    assert everything[waiting]["state"] == "queued"
    assert everything[first_ok]["state"] == everything[second_ok]["state"] == "succeeded"

    assert [job["id"] for job in listed(admin, "?state=failed")] == [flaky]
    assert [job["id"] for job in listed(admin, "?state=succeeded")] == [second_ok, first_ok]  # newest first
    assert [job["id"] for job in listed(admin, "?state=succeeded&limit=1")] == [second_ok]
    assert {job["id"] for job in listed(admin, "?function=ok-background")} == {first_ok, second_ok, waiting}
    assert [job["id"] for job in listed(admin, "?function=ok-background&state=queued,failed")] == [waiting]
    assert listed(admin, "?function=nobody") == []

    shown = admin.get(f"/.bgfn/admin/jobs/{flaky}", headers=AUTH)
    assert shown.status_code == 200
    assert shown.get_json() == status(admin, flaky)

    bad = admin.get("/.bgfn/admin/jobs?state=broken", headers=AUTH)
    assert bad.status_code == 400, bad.data
    assert "broken" in bad.get_json()["errorMessage"]


def test_failed_job_replayed_over_http_succeeds_through_gunicorn(
        site: Path, start_server: Callable[..., str], redis_url: str, marks: Path) -> None:
    base = start_server(site, BGFN_ADMIN_TOKEN=TOKEN)
    bearer = [("Authorization", f"Bearer {TOKEN}")]
    accepted = http(base, "POST", "/.netlify/functions/flaky-background")
    assert accepted.status == 202
    job_id = accepted.header("X-Bgfn-Job-Id")
    assert job_id
    run_worker_burst(site, redis_url, MARK_DIR=str(marks))

    failed = json.loads(http(base, "GET", "/.bgfn/admin/jobs?state=failed", headers=bearer).body)["jobs"]
    assert [job["id"] for job in failed] == [job_id]
    assert failed[0]["error"]["message"] == "the disk is broken"
    assert http(base, "POST", f"/.bgfn/admin/jobs/{job_id}/retry").status == 401

    (marks / "broken").unlink()
    replayed = http(base, "POST", f"/.bgfn/admin/jobs/{job_id}/retry", headers=bearer)
    assert replayed.status == 200, replayed.text
    view = json.loads(replayed.body)
    assert (view["id"], view["state"], view["attempts"]) == (job_id, "queued", 0)
    assert "error" not in view

    run_worker_burst(site, redis_url, MARK_DIR=str(marks))
    done = json.loads(http(base, "GET", f"/.bgfn/jobs/{job_id}").body)
    assert done["state"] == "succeeded", done
    assert done["result"] == {"fixed": True}
    assert (done["attempts"], done["max_attempts"]) == (1, 1)
    assert marked(marks, job_id) == 2
    assert json.loads(http(base, "GET", "/.bgfn/admin/jobs?state=failed", headers=bearer).body)["jobs"] == []

    # Only failed or canceled jobs are replayed.
    again = http(base, "POST", f"/.bgfn/admin/jobs/{job_id}/retry", headers=bearer)
    assert again.status == 409
    assert "succeeded" in json.loads(again.body)["errorMessage"]


def test_bulk_replay_of_one_functions_failed_jobs(admin: FlaskClient, site: Path, redis_url: str,
                                                  marks: Path) -> None:
    flaky = {accept(admin, "flaky-background") for _ in range(2)}
    other = accept(admin, "other-background")
    run_worker_burst(site, redis_url, MARK_DIR=str(marks))
    assert {job["id"] for job in listed(admin, "?state=failed")} == flaky | {other}

    (marks / "broken").unlink()
    response = admin.post("/.bgfn/admin/jobs/retry?function=flaky-background", headers=AUTH)
    assert response.status_code == 200, response.data
    assert set(response.get_json()["retried"]) == flaky
    run_worker_burst(site, redis_url, MARK_DIR=str(marks))

    assert all(status(admin, job_id)["state"] == "succeeded" for job_id in flaky)
    assert status(admin, other)["state"] == "failed"
    assert marked(marks, other) == 1
    assert admin.post("/.bgfn/admin/jobs/retry?function=flaky-background", headers=AUTH).get_json() == \
        {"retried": []}


def test_purge_deletes_finished_records(admin: FlaskClient, site: Path, redis_url: str, marks: Path) -> None:
    ok, flaky, other = accept(admin, "ok-background"), accept(admin, "flaky-background"), \
        accept(admin, "other-background")
    run_worker_burst(site, redis_url, MARK_DIR=str(marks))
    waiting = accept(admin, "ok-background")

    refused = admin.post("/.bgfn/admin/jobs/purge?state=queued", headers=AUTH)
    assert refused.status_code == 400, refused.data
    assert "queued" in refused.get_json()["errorMessage"]

    response = admin.post("/.bgfn/admin/jobs/purge?function=flaky-background", headers=AUTH)
    assert response.get_json() == {"purged": 1}
    assert admin.get(f"/.bgfn/jobs/{flaky}").status_code == 404
    assert status(admin, other)["state"] == "failed"

    assert admin.post("/.bgfn/admin/jobs/purge?state=succeeded", headers=AUTH).get_json() == {"purged": 1}
    assert admin.get(f"/.bgfn/jobs/{ok}").status_code == 404
    assert admin.post("/.bgfn/admin/jobs/purge", headers=AUTH).get_json() == {"purged": 1}
    assert admin.get(f"/.bgfn/jobs/{other}").status_code == 404
    assert [job["id"] for job in listed(admin)] == [waiting]  # queued jobs are never purged


def test_a_stopped_job_is_listed_as_canceled_not_failed(
        admin: FlaskClient, site: Path, start_worker: Callable[..., Process], marks: Path) -> None:
    worker = start_worker(site, MARK_DIR=str(marks), BGFN_SHUTDOWN_GRACE="1")
    running = accept(admin, "block-background")
    wait_for(lambda: marked(marks, running), what="the handler to start")
    assert admin.delete(f"/.bgfn/jobs/{running}").status_code == 200
    wait_for(lambda: status(admin, running)["state"] == "canceled", what="the job to stop")
    failing = accept(admin, "other-background")
    wait_for(lambda: status(admin, failing)["state"] == "failed", what="the other job to fail")
    assert worker.alive()

    assert [job["id"] for job in listed(admin, "?state=canceled")] == [running]
    assert [job["id"] for job in listed(admin, "?state=failed")] == [failing]
    # Replaying "all failed" jobs leaves the canceled one alone.
    replayed = admin.post("/.bgfn/admin/jobs/retry", headers=AUTH).get_json()["retried"]
    assert replayed == [failing]
    assert status(admin, running)["state"] == "canceled"


# --- bgfn jobs -----------------------------------------------------------------------------------

def test_cli_lists_shows_and_filters_jobs(admin: FlaskClient, site: Path, redis_url: str, marks: Path) -> None:
    assert cli(redis_url).output.splitlines()[-1] == "(no jobs)"
    ok, flaky = accept(admin, "ok-background"), accept(admin, "flaky-background")
    run_worker_burst(site, redis_url, MARK_DIR=str(marks))

    table = cli(redis_url)
    assert table.exit_code == 0, table.output
    summary, _, listing = table.output.partition("\n\n")
    assert summary.splitlines()[0].startswith("queue bgfn: 0 waiting, oldest waited -")
    lines = listing.splitlines()
    assert lines[0].split() == ["ID", "FUNCTION", "STATE", "TRIES", "ACCEPTED", "ERROR"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {ok, flaky}
    assert rows[ok].split()[1:4] == ["ok-background", "succeeded", "1/3"]
    assert rows[flaky].split()[1:4] == ["flaky-background", "failed", "1/1"]
    assert rows[flaky].endswith("RuntimeError: the disk is broken")

    failed = cli(redis_url, "--state", "failed", "--json")
    assert failed.exit_code == 0, failed.output
    [job] = json.loads(failed.output)
    assert (job["id"], job["state"], job["function"]) == (flaky, "failed", "flaky-background")
    assert job == status(admin, flaky)
    by_function = json.loads(cli(redis_url, "--function", "ok-background", "--json").output)
    assert [job["id"] for job in by_function] == [ok]

    shown = cli(redis_url, "show", ok)
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output) == status(admin, ok)

    missing = cli(redis_url, "show", "no-such-job")
    assert missing.exit_code == 1
    assert "no job has id 'no-such-job'" in missing.stderr


def test_cli_replays_a_failed_job_which_then_succeeds(admin: FlaskClient, site: Path, redis_url: str,
                                                      marks: Path) -> None:
    job_id = accept(admin, "flaky-background")
    run_worker_burst(site, redis_url, MARK_DIR=str(marks))
    assert status(admin, job_id)["state"] == "failed"

    (marks / "broken").unlink()
    result = cli(redis_url, "retry", job_id)
    assert result.exit_code == 0, result.output
    assert result.output == f"{job_id}: queued\n"
    run_worker_burst(site, redis_url, MARK_DIR=str(marks))
    done = status(admin, job_id)
    assert done["state"] == "succeeded" and done["result"] == {"fixed": True}
    assert marked(marks, job_id) == 2

    refused = cli(redis_url, "retry", job_id)
    assert refused.exit_code == 1
    assert f"job {job_id} is succeeded; only failed or canceled jobs can be retried." in refused.stderr


def test_cli_replays_failed_jobs_by_function_and_all(admin: FlaskClient, site: Path, redis_url: str,
                                                     marks: Path) -> None:
    flaky, other = accept(admin, "flaky-background"), accept(admin, "other-background")
    run_worker_burst(site, redis_url, MARK_DIR=str(marks))

    (marks / "broken").unlink()
    result = cli(redis_url, "retry", "--function", "flaky-background")
    assert result.exit_code == 0, result.output
    assert result.output == f"{flaky}: queued\n1 job queued again\n"
    run_worker_burst(site, redis_url, MARK_DIR=str(marks))
    assert status(admin, flaky)["state"] == "succeeded"
    assert status(admin, other)["state"] == "failed"

    everything = cli(redis_url, "retry", "--all-failed")
    assert everything.exit_code == 0, everything.output
    assert everything.output == f"{other}: queued\n1 job queued again\n"
    assert status(admin, other)["state"] == "queued"
    assert cli(redis_url, "retry", "--all-failed").output == "0 jobs queued again\n"


def test_cli_replays_a_canceled_job_with_its_full_retry_policy(
        admin: FlaskClient, site: Path, redis_url: str, redis_client: redis.Redis, marks: Path) -> None:
    job_id = accept(admin, "ok-background")  # Netlify's default policy: 3 attempts, after 60 s and 120 s
    assert admin.delete(f"/.bgfn/jobs/{job_id}").get_json()["state"] == "canceled"
    run_worker_burst(site, redis_url, MARK_DIR=str(marks))
    assert marked(marks, job_id) == 0
    assert [job["id"] for job in listed(admin, "?state=canceled")] == [job_id]

    result = cli(redis_url, "retry", job_id)
    assert (result.exit_code, result.output) == (0, f"{job_id}: queued\n")
    view = status(admin, job_id)
    assert (view["state"], view["attempts"], view["max_attempts"]) == ("queued", 0, 3)
    assert view["started_at"] is None and view["ended_at"] is None and "error" not in view
    stored = Job.fetch(job_id, connection=redis_client, serializer=JSONSerializer)
    assert (stored.retries_left, stored.retry_intervals) == (2, [60, 120])
    assert listed(admin, "?state=canceled") == []

    run_worker_burst(site, redis_url, MARK_DIR=str(marks))
    assert status(admin, job_id)["state"] == "succeeded"
    assert marked(marks, job_id) == 1


@pytest.mark.parametrize("args", [(), ("some-id", "--all-failed"), ("--function", "x", "--all-failed")])
def test_cli_retry_wants_exactly_one_target(redis_url: str, args: tuple[str, ...]) -> None:
    result = cli(redis_url, "retry", *args)
    assert result.exit_code == 2
    assert "name one job ID, or --function NAME, or --all-failed." in result.stderr


def test_cli_purges_finished_jobs(admin: FlaskClient, site: Path, redis_url: str, marks: Path) -> None:
    ok, flaky, other = accept(admin, "ok-background"), accept(admin, "flaky-background"), \
        accept(admin, "other-background")
    run_worker_burst(site, redis_url, MARK_DIR=str(marks))

    result = cli(redis_url, "purge", "--function", "flaky-background", "--state", "failed")
    assert (result.exit_code, result.output) == (0, "1 job record deleted\n")
    assert cli(redis_url, "show", flaky).exit_code == 1
    result = cli(redis_url, "purge")
    assert (result.exit_code, result.output) == (0, "2 job records deleted\n")
    for job_id in (ok, other):
        assert admin.get(f"/.bgfn/jobs/{job_id}").status_code == 404
    assert cli(redis_url, "purge").output == "0 job records deleted\n"


def test_cli_options_after_the_subcommand(admin: FlaskClient, site: Path, redis_url: str, marks: Path) -> None:
    job_id = accept(admin, "ok-background")
    result = CliRunner().invoke(main, ["jobs", "show", job_id, "--redis-url", redis_url], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["state"] == "queued"
    result = CliRunner().invoke(main, ["jobs", "purge", "--redis-url", redis_url], catch_exceptions=False)
    assert (result.exit_code, result.output) == (0, "0 job records deleted\n")


def test_cli_needs_redis() -> None:
    result = cli(None)
    assert result.exit_code == 2
    assert "REDIS_URL is not set" in result.stderr
    down = cli("redis://127.0.0.1:1/0", "show", "some-id")
    assert down.exit_code == 4
    assert "Redis is unreachable" in down.stderr
