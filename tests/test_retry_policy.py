"""Retry policy per function (issue "Background jobs you can see, steer and trust", point 2):
max_attempts, retry_delays, retry_backoff, max_event_age; Netlify's defaults and BGFN_RETRY_DELAYS;
bgfn.toml over the module's `config`; validation messages; retries watched on a real worker."""

from __future__ import annotations

import random
import textwrap
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient
from rq.job import Job
from rq.serializers import JSONSerializer

from bgfn.config import load_site
from bgfn.errors import ConfigError, FunctionLoadError
from bgfn.retry import Backoff, RetryPolicy, default_policy
from tests.conftest import load, run_worker_burst
from tests.helpers import Process, wait_for

MARK = """
    import os, pathlib, time
    def mark(context):
        with open(pathlib.Path(os.environ["MARK_DIR"], context.aws_request_id), "a") as file:
            file.write(f"{time.time()!r}\\n")
"""

FAILING = """
    from _shared.mark import mark
    def handler(event, context):
        mark(context)
        raise RuntimeError("still broken")
"""

MARKING = """
    from _shared.mark import mark
    def handler(event, context):
        mark(context)
        return "ran"
"""


def marked(marks: Path, job_id: str) -> list[float]:
    path = marks / job_id
    return [float(x) for x in path.read_text().split()] if path.exists() else []


def accept(client: FlaskClient, name: str) -> str:
    response = client.post(f"/.netlify/functions/{name}")
    assert response.status_code == 202, response.data
    return str(response.headers["X-Bgfn-Job-Id"])


def status(client: FlaskClient, job_id: str) -> dict[str, Any]:
    response = client.get(f"/.bgfn/jobs/{job_id}")
    assert response.status_code == 200, response.data
    return dict(response.get_json())


def when(stamp: str | None) -> float:
    assert stamp is not None, "no time given"
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def site_with(make_site: Callable[..., Path], functions: dict[str, str], bgfn_toml: str | None = None) -> Path:
    files = {"functions/_shared/mark.py": MARK, **{f"functions/{name}.py": code for name, code in functions.items()}}
    if bgfn_toml is not None:
        files["bgfn.toml"] = bgfn_toml
    return make_site(files)


# --- the policy's arithmetic ---------------------------------------------------------------------

def test_netlify_defaults_three_attempts_after_60_and_120_seconds() -> None:
    assert RetryPolicy().job_delays() == [60, 120]
    policy = default_policy((60, 120))
    assert (policy.max_attempts, policy.job_delays()) == (3, [60, 120])
    assert default_policy(()).job_delays() == []
    assert default_policy(()).max_attempts == 1


def test_delays_list_repeats_its_last_entry_and_stops_at_max_attempts() -> None:
    assert RetryPolicy(max_attempts=5, delays=(1, 5)).job_delays() == [1, 5, 5, 5]
    assert RetryPolicy(max_attempts=2, delays=(1, 5, 9)).job_delays() == [1]
    assert RetryPolicy(max_attempts=1, delays=(1, 5)).job_delays() == []


def test_backoff_without_jitter_is_exponential_and_capped() -> None:
    policy = RetryPolicy(max_attempts=8, backoff=Backoff(base=2, factor=3, max=100, jitter=0))
    assert policy.job_delays(random.Random(1)) == [2, 6, 18, 54, 100, 100, 100]
    doubling = RetryPolicy(max_attempts=5, backoff=Backoff(base=10, factor=2, max=3600, jitter=0))
    assert doubling.job_delays(random.Random(1)) == [10, 20, 40, 80]
    flat = RetryPolicy(max_attempts=4, backoff=Backoff(base=7, factor=1, max=3600, jitter=0))
    assert flat.job_delays(random.Random(1)) == [7, 7, 7]


def test_backoff_jitter_stays_within_its_bounds_and_under_the_cap() -> None:
    backoff = Backoff(base=10, factor=2, max=300, jitter=0.5)
    policy = RetryPolicy(max_attempts=10, backoff=backoff)
    raw = [min(300.0, 10 * 2.0 ** n) for n in range(9)]
    seen: set[tuple[int, ...]] = set()
    for seed in range(200):
        delays = policy.job_delays(random.Random(seed))
        assert len(delays) == 9
        for delay, expected in zip(delays, raw, strict=True):
            assert round(expected * 0.5) <= delay <= min(300, round(expected * 1.5)), (seed, delays)
        assert max(delays) <= 300
        seen.add(tuple(delays))
    assert len(seen) > 100  # jitter really spreads the delays
    # The same seed draws the same delays; the draws reach both sides of the raw delay.
    assert policy.job_delays(random.Random(42)) == policy.job_delays(random.Random(42))
    firsts = {policy.job_delays(random.Random(seed))[2] for seed in range(200)}
    assert min(firsts) < 40 < max(firsts)


def test_policy_describes_itself() -> None:
    assert RetryPolicy().describe() == "3 attempts, retries after 60 s, 120 s"
    assert RetryPolicy(max_attempts=1).describe() == "no retries"
    policy = RetryPolicy(max_attempts=4, backoff=Backoff(base=10, factor=2, max=600, jitter=0.2), max_event_age=3600)
    assert policy.describe() == "4 attempts, retries backoff 10 s x2 up to 600 s (±20%), dropped after 3600 s unstarted"


# --- configuration -------------------------------------------------------------------------------

WHERE = 'bgfn.toml: [functions."job-background"]'


@pytest.mark.parametrize(("setting", "message"), [
    ("max_attempts = 0",
     f"{WHERE} max_attempts = 0: expected a whole number from 1 to 100 (attempts in all, the first included), "
     "e.g. max_attempts = 3."),
    ("max_attempts = 2.5",
     f"{WHERE} max_attempts = 2.5: expected a whole number from 1 to 100 (attempts in all, the first included), "
     "e.g. max_attempts = 3."),
    ("max_attempts = 101",
     f"{WHERE} max_attempts = 101: expected a whole number from 1 to 100 (attempts in all, the first included), "
     "e.g. max_attempts = 3."),
    ('max_attempts = "3"',
     f"{WHERE} max_attempts = '3': expected a whole number from 1 to 100 (attempts in all, the first included), "
     "e.g. max_attempts = 3."),
    ("retry_delays = []",
     f"{WHERE} retry_delays = []: expected a non-empty list of seconds, e.g. retry_delays = [60, 120]."),
    ("retry_delays = 60",
     f"{WHERE} retry_delays = 60: expected a non-empty list of seconds, e.g. retry_delays = [60, 120]."),
    ("retry_delays = [5, -1]",
     f"{WHERE} retry_delays = [5, -1]: expected a list of seconds, each a number >= 0, "
     "e.g. retry_delays = [60, 120]."),
    ('retry_delays = [5, "1m"]',
     f"{WHERE} retry_delays = [5, '1m']: expected a list of seconds, each a number >= 0, "
     "e.g. retry_delays = [60, 120]."),
    ("retry_backoff = 10",
     f"{WHERE} retry_backoff = 10: expected a table with at least `base`, "
     "e.g. retry_backoff = {base = 10, factor = 2, max = 600, jitter = 0.2}."),
    ("retry_backoff = {factor = 2}",
     f"{WHERE} retry_backoff = {{'factor': 2}}: expected a table with at least `base`, "
     "e.g. retry_backoff = {base = 10, factor = 2, max = 600, jitter = 0.2}."),
    ("retry_backoff = {base = 1, cap = 5}",
     f"{WHERE} retry_backoff: unknown key(s) ['cap']; known: base, factor, max, jitter."),
    ('retry_backoff = {base = "ten"}',
     f"{WHERE} retry_backoff.base = 'ten': expected a number >= 0, e.g. retry_backoff.base = 10."),
    ("retry_backoff = {base = 1, factor = 0.5}",
     f"{WHERE} retry_backoff.factor = 0.5: expected a number >= 1, e.g. retry_backoff.factor = 2."),
    ("retry_backoff = {base = 1, max = -1}",
     f"{WHERE} retry_backoff.max = -1: expected a number >= 0, e.g. retry_backoff.max = 600."),
    ("retry_backoff = {base = 1, jitter = 2}",
     f"{WHERE} retry_backoff.jitter = 2: expected a fraction from 0 to 1, e.g. retry_backoff.jitter = 0.2."),
    ("max_event_age = 0",
     f"{WHERE} max_event_age = 0: expected a number >= 1, e.g. max_event_age = 3600."),
    ('max_event_age = "1h"',
     f"{WHERE} max_event_age = '1h': expected a number >= 1, e.g. max_event_age = 3600."),
    ("max_event_age = true",
     f"{WHERE} max_event_age = True: expected a number >= 1, e.g. max_event_age = 3600."),
])
def test_bad_retry_settings_in_bgfn_toml_are_named_exactly(
        make_site: Callable[..., Path], setting: str, message: str) -> None:
    site = site_with(make_site, {"job-background": MARKING}, f'[functions."job-background"]\n{setting}\n')
    with pytest.raises(ConfigError) as caught:
        load_site(site)
    assert str(caught.value) == message


@pytest.mark.parametrize(("config", "quoted"), [
    ('{"max_attempts": 0}', "max_attempts = 0: expected a whole number from 1 to 100"),
    ('{"retry_delays": "60,120"}', "retry_delays = '60,120': expected a non-empty list of seconds"),
    ('{"retry_backoff": {"base": 1, "jitter": 1.5}}', "retry_backoff.jitter = 1.5: expected a fraction from 0 to 1"),
    ('{"max_event_age": -5}', "max_event_age = -5: expected a number >= 1"),
])
def test_bad_retry_settings_in_module_config_name_the_file(
        make_site: Callable[..., Path], config: str, quoted: str) -> None:
    site = site_with(make_site, {"job-background": f"config = {config}\n" + textwrap.dedent(MARKING)})
    with pytest.raises(FunctionLoadError) as caught:
        load(site)
    [problem] = caught.value.problems
    assert problem.startswith("functions/job-background.py: config[")
    assert quoted in problem


def test_delays_and_backoff_together_are_refused(make_site: Callable[..., Path]) -> None:
    site = site_with(make_site, {"job-background": MARKING},
                     '[functions."job-background"]\nretry_delays = [1]\nretry_backoff = {base = 1}\n')
    with pytest.raises(FunctionLoadError) as caught:
        load(site)
    assert "retry_delays and retry_backoff are both set for one function: keep one." in str(caught.value)


def test_bgfn_toml_wins_over_the_module_config(make_site: Callable[..., Path], redis_client: redis.Redis,
                                               make_client: Callable[..., FlaskClient]) -> None:
    code = 'config = {"max_attempts": 5, "retry_delays": [7], "max_event_age": 100}\n' + textwrap.dedent(MARKING)
    site = site_with(make_site, {"job-background": code, "plain-background": MARKING,
                                 "own-background": code},
                     '[functions."job-background"]\nmax_attempts = 2\nmax_event_age = 50\n')
    _, registry = load(site)
    job = registry.get("job-background").retry
    assert (job.max_attempts, job.job_delays(), job.max_event_age) == (2, [7], 50)
    own = registry.get("own-background").retry  # no bgfn.toml section: the module's config
    assert (own.max_attempts, own.job_delays(), own.max_event_age) == (5, [7, 7, 7, 7], 100)
    plain = registry.get("plain-background").retry  # nothing set: Netlify's default
    assert (plain.max_attempts, plain.job_delays(), plain.max_event_age) == (3, [60, 120], None)

    # What the worker gets: the job record carries the winning policy.
    client = make_client(site)
    job_id = accept(client, "job-background")
    assert status(client, job_id)["max_attempts"] == 2
    stored = Job.fetch(job_id, connection=redis_client, serializer=JSONSerializer)
    assert stored.retries_left == 1 and stored.retry_intervals == [7]


def test_server_wide_retry_delays_set_the_default(make_site: Callable[..., Path], redis_client: redis.Redis,
                                                  make_client: Callable[..., FlaskClient]) -> None:
    site = site_with(make_site, {"plain-background": MARKING, "tuned-background": MARKING},
                     '[functions."tuned-background"]\nretry_delays = [3, 4]\n')
    client = make_client(site, retry_delays=(5, 6, 7))
    plain_id, tuned_id = accept(client, "plain-background"), accept(client, "tuned-background")
    assert status(client, plain_id)["max_attempts"] == 4
    assert status(client, tuned_id)["max_attempts"] == 3
    plain = Job.fetch(plain_id, connection=redis_client, serializer=JSONSerializer)
    assert (plain.retries_left, plain.retry_intervals) == (3, [5, 6, 7])
    tuned = Job.fetch(tuned_id, connection=redis_client, serializer=JSONSerializer)
    assert (tuned.retries_left, tuned.retry_intervals) == (2, [3, 4])

    no_retries = make_client(site, retry_delays=())
    once_id = accept(no_retries, "plain-background")
    assert status(no_retries, once_id)["max_attempts"] == 1
    assert not Job.fetch(once_id, connection=redis_client, serializer=JSONSerializer).retries_left


# --- watched on a real worker --------------------------------------------------------------------

def test_retries_happen_at_the_configured_times(
        make_site: Callable[..., Path], make_client: Callable[..., FlaskClient],
        start_worker: Callable[..., Process], marks: Path) -> None:
    site = site_with(make_site, {"fail-background": FAILING, "backoff-background": FAILING}, """
        [functions."fail-background"]
        retry_delays = [1, 2]

        [functions."backoff-background"]
        max_attempts = 4
        retry_backoff = {base = 1, factor = 3, max = 2, jitter = 0}
    """)
    client = make_client(site)  # the server-wide default stays Netlify's 60 s and 120 s
    worker = start_worker(site, MARK_DIR=str(marks))
    fail_id, backoff_id = accept(client, "fail-background"), accept(client, "backoff-background")

    seen: list[dict[str, Any]] = []

    def failed_both() -> bool:
        assert worker.alive(), worker.output()
        views = [status(client, fail_id), status(client, backoff_id)]
        seen.extend(views)
        return all(v["state"] == "failed" for v in views)

    wait_for(failed_both, timeout=30, interval=0.05, what="both jobs to use up their attempts")

    for job_id, expected_gaps in ((fail_id, [1, 2]), (backoff_id, [1, 2, 2])):
        times = marked(marks, job_id)
        assert len(times) == len(expected_gaps) + 1, times
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        for gap, expected in zip(gaps, expected_gaps, strict=True):
            assert expected - 0.05 <= gap < expected + 4.0, (job_id, gaps)
        final = status(client, job_id)
        assert (final["attempts"], final["max_attempts"]) == (len(times), len(times))
        assert final["error"] == {"type": "RuntimeError", "message": "still broken"}
        # Between attempts the job showed `scheduled`, with the time of its next attempt.
        waits = [v for v in seen if v["id"] == job_id and v["state"] == "scheduled"]
        assert {v["attempts"] for v in waits} == set(range(1, len(times))), waits
        for view in waits:
            ran, ran_next = times[view["attempts"] - 1], times[view["attempts"]]
            delay = expected_gaps[view["attempts"] - 1]
            announced = when(view["next_attempt_at"])
            # The delay counts from when the worker handled the failure, after the handler started (on a
            # loaded machine seconds later): never announced sooner than the delay allows, and the retry
            # ran when announced, not before (RQ's scheduler looks every second; the gaps' bound above).
            assert ran + delay - 0.05 <= announced <= ran_next + 0.05, (view, times)
            assert ran_next <= announced + 4.0, (view, times)
            assert view["error"]["type"] == "RuntimeError"


def test_event_older_than_max_event_age_fails_unrun(
        make_site: Callable[..., Path], make_client: Callable[..., FlaskClient], redis_url: str,
        marks: Path) -> None:
    site = site_with(make_site, {"stale-background": MARKING, "patient-background": MARKING},
                     '[functions."stale-background"]\nmax_event_age = 1\nretry_delays = [1]\n')
    client = make_client(site)
    stale_id, patient_id = accept(client, "stale-background"), accept(client, "patient-background")
    accepted_at = when(status(client, stale_id)["accepted_at"])
    assert status(client, stale_id)["max_attempts"] == 2

    # No worker yet: let the event grow older than its max_event_age.
    wait_for(lambda: time.time() > accepted_at + 1.5, timeout=10, interval=0.05, what="the event to age")
    output = run_worker_burst(site, redis_url, MARK_DIR=str(marks))

    stale = status(client, stale_id)
    assert stale["state"] == "failed", stale
    assert stale["error"]["type"] == "EventExpired"
    assert "max_event_age = 1 s for stale-background" in stale["error"]["message"]
    assert "dropped without running" in stale["error"]["message"]
    assert stale["attempts"] == 0  # no attempt was made, and none is scheduled
    assert marked(marks, stale_id) == []
    assert "EventExpired" in output or "dropped without running" in output
    # A function without max_event_age runs however long it waited.
    patient = status(client, patient_id)
    assert patient["state"] == "succeeded" and patient["result"] == "ran"
    assert len(marked(marks, patient_id)) == 1
