"""CONTRACT §5: turning the handler's return value into the HTTP answer."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from tests.helpers import http

# The function returns whatever the request body (JSON) describes, so one site covers every case.
RETURNS = """
    import json
    def handler(event, context):
        spec = json.loads(event["body"])
        if spec.get("python") is not None:
            return eval(spec["python"])
        return spec["value"]
"""

ASYNC = """
    import asyncio
    async def handler(event, context):
        await asyncio.sleep(0)
        return {"statusCode": 201, "headers": {"X-Async": "yes"}, "body": "from async " + event["httpMethod"]}
"""

LEAKY_HEADERS = {"X-Leak": "yes", "Content-Type": "text/html", "Set-Cookie": "session=1", "Cache-Control": "public"}


@pytest.fixture
def client(make_site: Callable[..., Path], make_client: Callable[..., FlaskClient]) -> FlaskClient:
    return make_client(make_site({"functions/returns.py": RETURNS, "functions/async-fn.py": ASYNC}))


def answer(client: FlaskClient, value: Any = None, *, python: str | None = None, method: str = "POST") -> TestResponse:
    """Have the function return `value` (JSON-able) or the Python expression `python`."""
    spec = json.dumps({"value": value, "python": python})
    return client.open("/.netlify/functions/returns", method=method, data=spec, content_type="application/json")


def header_pairs(response: TestResponse) -> list[tuple[str, str]]:
    return list(response.headers.items())


def test_status_and_body_are_sent(client: FlaskClient) -> None:
    response = answer(client, {"statusCode": 418, "body": "I'm a teapot ✓"})
    assert response.status_code == 418
    assert response.get_data() == "I'm a teapot ✓".encode()
    assert response.headers["Content-Length"] == str(len("I'm a teapot ✓".encode()))


@pytest.mark.parametrize("value", [{"statusCode": 200}, {"statusCode": 200, "body": ""},
                                   {"statusCode": 200, "body": None}])
def test_absent_or_empty_body_sends_no_body(client: FlaskClient, value: dict[str, Any]) -> None:
    response = answer(client, value)
    assert response.status_code == 200
    assert response.get_data() == b""


def test_header_name_case_is_kept(client: FlaskClient) -> None:
    response = answer(client, {"statusCode": 200, "body": "x", "headers": {"X-CamelCase-Header": "A", "x-lower": "b",
                                                                           "X-UPPER": "c"},
                               "multiValueHeaders": {"X-Multi-Case": ["d", "e"]}})
    names = [name for name, _ in header_pairs(response)]
    for name in ("X-CamelCase-Header", "x-lower", "X-UPPER", "X-Multi-Case"):
        assert name in names
    assert "X-Camelcase-Header" not in names and "X-Lower" not in names and "X-Upper" not in names


def test_numbers_and_booleans_become_text(client: FlaskClient) -> None:
    response = answer(client, python='{"statusCode": 200, "headers": {"X-Int": 5, "X-Float": 1.5, "X-Whole": 2.0, '
                                     '"X-True": True, "X-False": False, "X-Neg": -3}, '
                                     '"multiValueHeaders": {"X-List": [1, True, "s"]}}')
    assert response.status_code == 200, response.get_data(as_text=True)
    headers = response.headers
    assert headers["X-Int"] == "5"
    assert headers["X-Float"] == "1.5"
    assert headers["X-Whole"] == "2"
    assert headers["X-True"] == "true"
    assert headers["X-False"] == "false"
    assert headers["X-Neg"] == "-3"
    assert headers.getlist("X-List") == ["1", "true", "s"]


def test_multi_value_headers_are_sent_repeated(client: FlaskClient) -> None:
    response = answer(client, {"statusCode": 200, "multiValueHeaders": {"Set-Cookie": ["a=1; Path=/", "b=2"]}})
    assert response.headers.getlist("Set-Cookie") == ["a=1; Path=/", "b=2"]


def test_multi_value_headers_win_over_headers(client: FlaskClient) -> None:
    response = answer(client, {"statusCode": 200,
                               "headers": {"X-Both": "single", "set-cookie": "dropped=1", "X-Only": "kept"},
                               "multiValueHeaders": {"x-both": ["m1", "m2"], "Set-Cookie": ["c=3"]}})
    assert response.headers.getlist("X-Both") == ["m1", "m2"]
    assert response.headers.getlist("Set-Cookie") == ["c=3"]
    assert response.headers["X-Only"] == "kept"
    names = [name for name, _ in header_pairs(response)]
    assert "x-both" in names and "X-Both" not in names  # the multi value's spelling


def test_no_content_type_is_added(client: FlaskClient) -> None:
    response = answer(client, {"statusCode": 200, "body": "<p>plain</p>"})
    assert "Content-Type" not in response.headers
    set_by_function = answer(client, {"statusCode": 200, "body": "{}", "headers": {"content-type": "x/y; a=b"}})
    assert set_by_function.headers.getlist("Content-Type") == ["x/y; a=b"]


@pytest.mark.parametrize("status", [204, 304])
def test_204_and_304_send_no_body(client: FlaskClient, status: int) -> None:
    response = answer(client, {"statusCode": status, "body": "must not be sent", "headers": {"X-Kept": "1"}})
    assert response.status_code == status
    assert response.get_data() == b""
    assert response.headers["X-Kept"] == "1"
    assert response.headers.get("Content-Length") in (None, "0")


def test_head_sends_no_body(make_site: Callable[..., Path], make_client: Callable[..., FlaskClient]) -> None:
    site = make_site({"functions/page.py": """
        def handler(event, context):
            return {"statusCode": 200, "headers": {"X-Page": "1"}, "body": "the page"}
    """})
    response = make_client(site).head("/.netlify/functions/page")
    assert response.status_code == 200
    assert response.get_data() == b""
    assert response.headers["X-Page"] == "1"


def test_base64_bodies_are_decoded(client: FlaskClient) -> None:
    raw = bytes(range(256)) * 3
    response = answer(client, {"statusCode": 200, "isBase64Encoded": True, "body": base64.b64encode(raw).decode()})
    assert response.get_data() == raw
    assert response.headers["Content-Length"] == str(len(raw))
    not_encoded = answer(client, {"statusCode": 200, "isBase64Encoded": False, "body": "aGk="})
    assert not_encoded.get_data() == b"aGk="


def test_async_handler(client: FlaskClient) -> None:
    for _ in range(3):  # the event loop survives between invocations
        response = client.put("/.netlify/functions/async-fn")
        assert response.status_code == 201
        assert response.get_data() == b"from async PUT"
        assert response.headers["X-Async"] == "yes"


# --- bad return values: 500, a message that says what was wrong, none of the function's headers -----


@pytest.mark.parametrize(("python", "message"), [
    ('{"statusCode": "abc", "body": "x"}', "Your function response must have a numerical statusCode. You gave: 'abc'"),
    ('{"statusCode": 200, "body": {"not": "a string"}}',
     "Your function response must have a string body. You gave: {'not': 'a string'}"),
    ("None", "lambda response was None. check your function code again"),
])
def test_bad_return_values_exact_messages(client: FlaskClient, python: str, message: str) -> None:
    response = answer(client, python=python)
    assert response.status_code == 500
    assert response.mimetype == "application/json"
    assert json.loads(response.get_data())["errorMessage"] == message


@pytest.mark.parametrize("python", [
    '{"statusCode": "abc"}',
    '{"body": "no status"}',
    '{"statusCode": None}',
    '{"statusCode": True}',
    '{"statusCode": 99}',
    '{"statusCode": 600}',
    '{"statusCode": 0}',
    '{"statusCode": -200}',
    '{"statusCode": 1000}',
    '{"statusCode": 200.5}',
    '{"statusCode": 200, "body": {"not": "a string"}}',
    '{"statusCode": 200, "body": b"bytes"}',
    '{"statusCode": 200, "body": 5}',
    '{"statusCode": 200, "body": ["a"]}',
    '{"statusCode": 200, "body": "!!!", "isBase64Encoded": True}',
    '{"statusCode": 200, "headers": {"X-Bad": {"a": 1}}}',
    '{"statusCode": 200, "headers": {"X-Bad": None}}',
    '{"statusCode": 200, "headers": {"X-Bad": "a\\r\\nInjected: 1"}}',
    '{"statusCode": 200, "headers": {"X-Bad": "snow \u2603"}}',
    '{"statusCode": 200, "headers": {"X-Bad": "bell \x07"}}',
    '{"statusCode": 200, "multiValueHeaders": {"X-Bad": ["ok", "del \x7f"]}}',
    '{"statusCode": 200, "headers": {"Bad Name": "v"}}',
    '{"statusCode": 200, "headers": ["X-A", "b"]}',
    '{"statusCode": 200, "multiValueHeaders": {"X-Bad": "not a list"}}',
    '{"statusCode": 200, "multiValueHeaders": {"X-Bad": [{"a": 1}]}}',
    "None",
    '"just a string"',
    "[200, 'body']",
    "200",
])
def test_bad_return_value_is_500_without_the_functions_headers(client: FlaskClient, python: str) -> None:
    if python.startswith("{"):  # add the function's own headers to the bad answer, as a separate key if taken
        key = "multiValueHeaders" if '"headers"' in python else "headers"
        leaky = {k: [v] for k, v in LEAKY_HEADERS.items()} if key == "multiValueHeaders" else LEAKY_HEADERS
        python = python[:-1] + f", {key!r}: {leaky!r}" + "}"
    response = answer(client, python=python)
    assert response.status_code == 500, (python, response.get_data(as_text=True))
    assert response.mimetype == "application/json"
    body = json.loads(response.get_data())
    assert set(body) == {"errorType", "errorMessage"}
    assert body["errorMessage"]
    for name in LEAKY_HEADERS:
        if name != "Content-Type":
            assert name not in response.headers, (python, name)
    assert response.headers.getlist("Content-Type") == ["application/json"]
    assert "Injected" not in response.headers


def test_bad_status_message_names_the_status(client: FlaskClient) -> None:
    for status in (99, 600):
        response = answer(client, {"statusCode": status})
        assert response.status_code == 500
        assert str(status) in json.loads(response.get_data())["errorMessage"]


def test_informational_status_is_a_bad_return_value(client: FlaskClient) -> None:
    # A 1xx sent as the final answer leaves the client waiting forever: refuse it with a reason.
    for status in (100, 101, 199):
        response = answer(client, {"statusCode": status})
        assert response.status_code == 500
        message = json.loads(response.get_data())["errorMessage"]
        assert "final statusCode" in message and str(status) in message


# --- through gunicorn ---------------------------------------------------------------------------------


def test_response_mapping_through_gunicorn(make_site: Callable[..., Path], start_server: Callable[..., str]) -> None:
    base = start_server(make_site({"functions/returns.py": RETURNS}))

    def call(value: Any, method: str = "POST") -> Any:
        return http(base, method, "/.netlify/functions/returns", body=json.dumps({"value": value}).encode(),
                    headers=[("Content-Type", "application/json")])

    mapped = call({"statusCode": 200, "body": "body",
                   "headers": {"X-CamelCase": "a", "x-both": "dropped", "X-Num": 7},
                   "multiValueHeaders": {"X-Both": ["m1", "m2"], "Set-Cookie": ["a=1", "b=2"]}})
    assert (mapped.status, mapped.body) == (200, b"body")
    assert ("X-CamelCase", "a") in mapped.headers
    assert ("X-Num", "7") in mapped.headers
    assert [v for k, v in mapped.headers if k == "X-Both"] == ["m1", "m2"]
    assert not [k for k, _ in mapped.headers if k == "x-both"]
    assert [v for k, v in mapped.headers if k.lower() == "set-cookie"] == ["a=1", "b=2"]
    assert mapped.header("Content-Type") is None

    head = call({"statusCode": 200, "body": "not sent to HEAD", "headers": {"X-Head": "1"}}, method="HEAD")
    assert (head.status, head.body, head.header("X-Head")) == (200, b"", "1")
    no_content = call({"statusCode": 204, "body": "not sent"})
    assert (no_content.status, no_content.body) == (204, b"")

    bad = call({"statusCode": "abc", "headers": {"X-Leak": "yes", "Content-Type": "text/html"}})
    assert bad.status == 500
    assert bad.header("X-Leak") is None
    assert bad.header("Content-Type") == "application/json"
    assert json.loads(bad.body)["errorMessage"] == \
        "Your function response must have a numerical statusCode. You gave: 'abc'"

    # A header value gunicorn refuses to send is a bad return value too, answered by bgfn in JSON.
    unsendable = call({"statusCode": 200, "body": "x", "headers": {"X-Leak": "yes", "X-Snow": "\u2603"}})
    assert unsendable.status == 500
    assert unsendable.header("X-Leak") is None
    assert "X-Snow" in json.loads(unsendable.body)["errorMessage"]
