"""CONTRACT §6, synchronous side: a handler that raises, the time limit, the request body limit."""

from __future__ import annotations

import io
import json
import os
import textwrap
import time
from collections.abc import Callable
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from bgfn import defaults
from tests.helpers import HttpResult, http, wait_for

LIMIT = 6 * 1024 * 1024

RAISES = """
    class QuotaExceeded(Exception):
        pass

    def handler(event, context):
        kind = event["queryStringParameters"].get("kind")
        if kind == "custom":
            raise QuotaExceeded("over quota: 3 > 2")
        if kind == "exit":
            raise SystemExit(3)
        raise ValueError("boom")
"""

ASYNC_RAISES = """
    import asyncio
    async def handler(event, context):
        await asyncio.sleep(0)
        raise KeyError("missing")
"""

# Counts its invocations (GET reads the count) and answers the length of the body it got.
SIZE = """
    calls = []
    def handler(event, context):
        if event["httpMethod"] == "GET":
            return {"statusCode": 200, "body": str(len(calls))}
        calls.append(1)
        return {"statusCode": 200, "body": str(len(event["body"] or ""))}
"""

SLEEPS = """
    import time
    def handler(event, context):
        time.sleep(5)
        return {"statusCode": 200, "body": "too late"}
"""

OK = """
    import os
    def handler(event, context):
        return {"statusCode": 200, "body": str(os.getpid())}
"""

# Holds the GIL in pure Python: only a process recycle gets rid of it. Writes its pid first.
SPIN = """
    import os, pathlib
    def handler(event, context):
        pathlib.Path(os.environ["PID_DIR"], context.function_name).write_text(str(os.getpid()))
        while True:
            pass
"""

# Blocked in a C call (the GIL released), the most common way to time out. Writes its pid first.
NAP = """
    import os, pathlib, time
    config = {"timeout": 1}
    def handler(event, context):
        pathlib.Path(os.environ["PID_DIR"], context.function_name).write_text(str(os.getpid()))
        time.sleep(120)
        return {"statusCode": 200, "body": "too late"}
"""


def error_body(data: bytes) -> dict[str, object]:
    body = json.loads(data)
    assert isinstance(body, dict)
    return body


# --- the handler raises ---------------------------------------------------------------------------


@pytest.fixture
def raising_site(make_site: Callable[..., Path]) -> Path:
    return make_site({"functions/raises.py": RAISES, "functions/async-raises.py": ASYNC_RAISES})


def test_handler_raising_is_502_json(raising_site: Path, make_client: Callable[..., FlaskClient]) -> None:
    client = make_client(raising_site)
    response = client.post("/.netlify/functions/raises/sub")
    assert response.status_code == 502
    assert response.mimetype == "application/json"
    assert error_body(response.get_data()) == {"errorType": "ValueError", "errorMessage": "boom"}
    custom = client.get("/.netlify/functions/raises?kind=custom")
    assert custom.status_code == 502
    assert error_body(custom.get_data()) == {"errorType": "QuotaExceeded", "errorMessage": "over quota: 3 > 2"}
    exits = client.get("/.netlify/functions/raises?kind=exit")
    assert exits.status_code == 502
    assert error_body(exits.get_data()) == {"errorType": "SystemExit", "errorMessage": "3"}


def test_async_handler_raising_is_502_json(raising_site: Path, make_client: Callable[..., FlaskClient]) -> None:
    response = make_client(raising_site).get("/.netlify/functions/async-raises")
    assert response.status_code == 502
    assert error_body(response.get_data()) == {"errorType": "KeyError", "errorMessage": "'missing'"}


def test_trace_only_in_development_mode(raising_site: Path, make_client: Callable[..., FlaskClient]) -> None:
    response = make_client(raising_site, dev=True).get("/.netlify/functions/raises")
    assert response.status_code == 502
    body = error_body(response.get_data())
    assert body["errorType"] == "ValueError"
    assert body["errorMessage"] == "boom"
    trace = body["trace"]
    assert isinstance(trace, list) and all(isinstance(line, str) for line in trace)
    text = "".join(trace)
    assert "raises.py" in text
    assert "ValueError: boom" in text
    assert "trace" not in error_body(make_client(raising_site, dev=False).get("/.netlify/functions/raises").get_data())


def test_handler_raising_logs_the_trace(raising_site: Path, make_client: Callable[..., FlaskClient],
                                        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("ERROR", logger="bgfn"):
        make_client(raising_site).get("/.netlify/functions/raises")
    assert "ValueError: boom" in caplog.text
    assert "raises.py" in caplog.text


def test_handler_raising_through_gunicorn(raising_site: Path, start_server: Callable[..., str]) -> None:
    base = start_server(raising_site)
    answer = http(base, "GET", "/.netlify/functions/raises")
    assert answer.status == 502
    assert (answer.header("Content-Type") or "").startswith("application/json")
    assert error_body(answer.body) == {"errorType": "ValueError", "errorMessage": "boom"}
    exits = http(base, "GET", "/.netlify/functions/raises?kind=exit")  # must not stop the worker
    assert error_body(exits.body) == {"errorType": "SystemExit", "errorMessage": "3"}
    assert http(base, "GET", "/.netlify/functions/raises").status == 502
    dev_base = start_server(raising_site, BGFN_DEV="true")
    dev_answer = http(dev_base, "GET", "/.netlify/functions/raises")
    assert dev_answer.status == 502
    trace = error_body(dev_answer.body)["trace"]
    assert isinstance(trace, list)
    assert "ValueError: boom" in "".join(trace)


# --- the synchronous time limit ---------------------------------------------------------------------


def test_default_sync_timeout_is_30_seconds() -> None:
    assert defaults.SYNC_TIMEOUT == 30.0


@pytest.mark.parametrize(("files", "settings", "message"), [
    ({"functions/slow.py": textwrap.dedent(SLEEPS) + '\nconfig = {"timeout": 0.5}\n'}, {},
     "Task timed out after 0.50 seconds"),
    ({"functions/slow.py": SLEEPS, "bgfn.toml": '[functions."slow"]\ntimeout = 0.25\n'}, {},
     "Task timed out after 0.25 seconds"),
    ({"functions/slow.py": SLEEPS}, {"sync_timeout": 0.3}, "Task timed out after 0.30 seconds"),
])
def test_timeout_is_502_json(make_site: Callable[..., Path], make_client: Callable[..., FlaskClient],
                             files: dict[str, str], settings: dict[str, float], message: str) -> None:
    client = make_client(make_site({**files, "functions/ok.py": OK}), **settings)
    started = time.monotonic()
    response = client.get("/.netlify/functions/slow")
    elapsed = time.monotonic() - started
    assert response.status_code == 502
    assert response.mimetype == "application/json"
    assert error_body(response.get_data()) == {"errorType": "TimeoutError", "errorMessage": message}
    assert elapsed < 4  # answered at the limit, not when the handler returns
    assert client.get("/.netlify/functions/ok").status_code == 200


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie the master has not reaped yet is gone too
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return False


def test_stuck_handler_times_out_and_the_server_stays_healthy(make_site: Callable[..., Path],
                                                              start_server: Callable[..., str],
                                                              tmp_path: Path) -> None:
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    site = make_site({
        "functions/spin-config.py": textwrap.dedent(SPIN) + '\nconfig = {"timeout": 1}\n',
        "functions/spin-toml.py": SPIN,
        "functions/nap.py": NAP,
        "functions/ok.py": OK,
        "bgfn.toml": '[functions."spin-toml"]\ntimeout = 1\n',
    })
    base = start_server(site, "--workers", "1", PID_DIR=str(pid_dir))  # only the replacement can answer
    assert http(base, "GET", "/.netlify/functions/ok").status == 200

    for name in ("spin-config", "spin-toml", "nap"):
        started = time.monotonic()
        stuck = http(base, "POST", f"/.netlify/functions/{name}", body=b"{}",
                     headers=[("Content-Type", "application/json")])
        elapsed = time.monotonic() - started
        assert stuck.status == 502, stuck.text
        assert (stuck.header("Content-Type") or "").startswith("application/json")
        assert error_body(stuck.body) == {"errorType": "TimeoutError",
                                          "errorMessage": "Task timed out after 1.00 seconds"}
        assert 1 <= elapsed < 5
        pid_file = pid_dir / name
        stuck_pid = int(wait_for(lambda f=pid_file: f.exists() and f.read_text(), what=f"{name} to write its pid"))

        # Other functions answer while the stuck worker is being recycled...
        for _ in range(3):
            assert http(base, "GET", "/.netlify/functions/ok").status == 200
        wait_for(lambda pid=stuck_pid: _gone(pid), timeout=30, what=f"the worker stuck in {name} to be recycled")
        # ...and after, from live workers.
        for _ in range(6):
            ok = http(base, "GET", "/.netlify/functions/ok")
            assert ok.status == 200
            assert int(ok.body) != stuck_pid


# --- the request body limit -----------------------------------------------------------------------


@pytest.fixture
def size_client(make_site: Callable[..., Path], make_client: Callable[..., FlaskClient]) -> FlaskClient:
    return make_client(make_site({"functions/size.py": SIZE}))


def test_body_at_the_limit_is_accepted(size_client: FlaskClient) -> None:
    response = size_client.post("/.netlify/functions/size", data=b"a" * LIMIT, content_type="text/plain")
    assert response.status_code == 200
    assert response.get_data() == str(LIMIT).encode()


def test_body_over_the_limit_is_413_json(size_client: FlaskClient) -> None:
    response = size_client.post("/.netlify/functions/size", data=b"a" * (LIMIT + 1), content_type="text/plain")
    assert response.status_code == 413
    assert response.mimetype == "application/json"
    body = error_body(response.get_data())
    assert set(body) == {"errorType", "errorMessage"}
    assert "6 MiB" in str(body["errorMessage"])
    assert size_client.get("/.netlify/functions/size").get_data() == b"0"  # the handler never ran


def test_body_over_the_limit_without_content_length_is_413(size_client: FlaskClient) -> None:
    import io

    for size, status in ((LIMIT, 200), (LIMIT + 1, 413)):
        response = size_client.post("/.netlify/functions/size", input_stream=io.BytesIO(b"a" * size),
                                    content_type="text/plain", environ_overrides={"wsgi.input_terminated": True})
        assert response.status_code == status
    assert size_client.get("/.netlify/functions/size").get_data() == b"1"


def _chunked(base: str, path: str, body: bytes, chunk: int = 256 * 1024) -> HttpResult:
    conn = HTTPConnection(base.split("://", 1)[1], timeout=30)
    try:
        conn.putrequest("POST", path, skip_accept_encoding=True)
        conn.putheader("Content-Type", "text/plain")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        try:
            for start in range(0, len(body), chunk):
                piece = body[start:start + chunk]
                conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            conn.send(b"0\r\n\r\n")
        except OSError:  # the server may answer 413 and stop reading before the end
            pass
        response = conn.getresponse()
        return HttpResult(response.status, list(response.getheaders()), response.read())
    finally:
        conn.close()


def _declared_only(base: str, path: str, length: int) -> HttpResult:
    """Announce a body of `length` bytes but send none: the answer must not wait for it."""
    conn = HTTPConnection(base.split("://", 1)[1], timeout=30)
    try:
        conn.putrequest("POST", path, skip_accept_encoding=True)
        conn.putheader("Content-Type", "text/plain")
        conn.putheader("Content-Length", str(length))
        conn.endheaders()
        response = conn.getresponse()
        return HttpResult(response.status, list(response.getheaders()), response.read())
    finally:
        conn.close()


def test_body_limit_through_gunicorn(make_site: Callable[..., Path], start_server: Callable[..., str]) -> None:
    base = start_server(make_site({"functions/size.py": SIZE}))
    path = "/.netlify/functions/size"

    small = _chunked(base, path, b"hello chunked", chunk=5)
    assert (small.status, small.body) == (200, b"13")
    at_limit = _chunked(base, path, b"a" * LIMIT)
    assert (at_limit.status, at_limit.body) == (200, str(LIMIT).encode())

    for answer in (_chunked(base, path, b"a" * (LIMIT + 1)), _declared_only(base, path, LIMIT + 1)):
        assert answer.status == 413
        assert (answer.header("Content-Type") or "").startswith("application/json")
        assert set(error_body(answer.body)) == {"errorType", "errorMessage"}
    assert http(base, "GET", "/.netlify/functions/ok").status == 404  # still serving
    assert http(base, "POST", path, body=b"after", headers=[("Content-Type", "text/plain")]).body == b"5"


class _GoneMidBody(io.RawIOBase):
    """A request body whose client went away: reading raises, as gunicorn's reader does (NoMoreData)."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        raise OSError("No more data after: b'ab'")


def _gone_mid_body(terminated: bool) -> dict[str, Any]:
    from werkzeug.test import EnvironBuilder

    environ = EnvironBuilder(path="/.netlify/functions/size", method="POST", content_type="text/plain",
                             data=b"abc").get_environ()
    environ["wsgi.input"] = _GoneMidBody()
    environ.pop("wsgi.input_terminated", None)
    if terminated:
        environ["wsgi.input_terminated"] = True  # as gunicorn sets it
    return environ


def test_a_client_gone_mid_body_is_left_to_gunicorn_and_not_logged_as_a_bug(
        size_client: FlaskClient, caplog: pytest.LogCaptureFixture) -> None:
    """Under gunicorn (its input is marked terminated) the reader's OSError goes through for gunicorn to
    drop the connection: there is nobody to answer, and it is not a fault of bgfn's to log."""
    from werkzeug.test import run_wsgi_app

    with pytest.raises(OSError, match="No more data"):
        run_wsgi_app(size_client.application, _gone_mid_body(terminated=True), buffered=True)
    assert "bgfn failed to answer" not in caplog.text
    assert size_client.get("/.netlify/functions/size").get_data() == b"0"  # the handler never ran


def test_a_client_gone_mid_body_under_werkzeugs_bounded_stream_is_400_json(
        size_client: FlaskClient, caplog: pytest.LogCaptureFixture) -> None:
    """A server that does not mark its input terminated gets werkzeug's bounded stream, which turns the
    same failure into ClientDisconnected: answered 400 with what was wrong, not 500."""
    from werkzeug.test import run_wsgi_app

    answer, status, _ = run_wsgi_app(size_client.application, _gone_mid_body(terminated=False), buffered=True)
    assert status.startswith("400 "), status
    body = error_body(b"".join(answer))
    assert body["errorType"] == "ClientDisconnected"
    assert "could not be read" in str(body["errorMessage"])
    assert "bgfn failed to answer" not in caplog.text
    assert size_client.get("/.netlify/functions/size").get_data() == b"0"  # the handler never ran


def test_a_fault_in_bgfn_itself_is_a_json_500_with_the_trace_logged(
        size_client: FlaskClient, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Function calls are answered before Flask (bgfn.app.FunctionCalls), so bgfn turns its own
    unexpected exceptions into its JSON error body, as it does every other error, and logs the trace."""
    import bgfn.app

    def broken(**_: Any) -> dict[str, Any]:
        raise KeyError("no such field")

    monkeypatch.setattr(bgfn.app, "build_event", broken)
    response = size_client.post("/.netlify/functions/size", data=b"abc", content_type="text/plain")
    assert response.status_code == 500
    body = error_body(response.get_data())
    assert body["errorType"] == "InternalServerError"
    assert "/.netlify/functions/size" in str(body["errorMessage"])
    assert "bgfn failed to answer POST /.netlify/functions/size" in caplog.text
    assert "KeyError: 'no such field'" in caplog.text
