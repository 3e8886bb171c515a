"""CONTRACT §2 (routing) and the JSON 404 of §10 under /.bgfn/."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from tests.helpers import http

NOT_FOUND = b"Function not found..."
BAD_NAME = b"Function name should consist only of alphanumeric characters, hyphen & underscores."

ECHO = """
    import json
    def handler(event, context):
        return {"statusCode": 200, "headers": {"X-Echo": "yes"},
                "body": json.dumps({"path": event["path"], "method": event["httpMethod"]})}
"""

SITE = {
    "functions/echo.py": ECHO,
    "functions/Mixed_Case-1.py": ECHO,
    "functions/_shared/__init__.py": "",
    "functions/_shared/_shared.py": ECHO,
}

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "PROPFIND", "PURGE", "MKCOL"]


@pytest.fixture
def client(make_site: Callable[..., Path], make_client: Callable[..., FlaskClient]) -> FlaskClient:
    return make_client(make_site(SITE))


@pytest.mark.parametrize("path", [
    "/.netlify/functions/echo",
    "/.netlify/functions/echo/",
    "/.netlify/functions/echo/any/sub/path",
    "/.netlify/functions/echo/any/sub/path/",
    "/.netlify/functions/echo//double//slashes",
    "/.netlify/functions/echo/%C3%A9t%C3%A9/a%2Fb",
    "/.netlify/functions/echo/.netlify/functions/other",
    "/.netlify/functions/Mixed_Case-1/x",
])
def test_function_runs_and_sees_the_full_original_path(client: FlaskClient, path: str) -> None:
    response = client.get(path + "?q=1")
    assert response.status_code == 200, response.get_data(as_text=True)
    assert json.loads(response.get_data())["path"] == path


@pytest.mark.parametrize("method", METHODS)
def test_every_method_reaches_the_function(client: FlaskClient, method: str) -> None:
    response = client.open("/.netlify/functions/echo/sub", method=method)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.headers["X-Echo"] == "yes"
    assert json.loads(response.get_data()) == {"path": "/.netlify/functions/echo/sub", "method": method}


@pytest.mark.parametrize("path", [
    "/.netlify/functions/",
    "/.netlify/functions/nope",
    "/.netlify/functions/nope/sub/path",
    "/.netlify/functions/Echo",
    "/.netlify/functions/ECHO/sub",
    "/.netlify/functions/mixed_case-1",
    "/.netlify/functions/%65cho",
    "/.netlify/functions/ech%6F/sub",
    "/.netlify/functions/_shared",
    "/.netlify/functions/echo-background",
])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_unknown_function_is_404(client: FlaskClient, path: str, method: str) -> None:
    response = client.open(path, method=method)
    assert response.status_code == 404
    assert response.get_data() == NOT_FOUND
    assert "X-Echo" not in response.headers


@pytest.mark.parametrize("path", [
    "/.netlify/functions/bad.name",
    "/.netlify/functions/a!b/sub",
    "/.netlify/functions/echo~",
    "/.netlify/functions/a:b",
    "/.netlify/functions/a@b",
    "/.netlify/functions/a,b",
])
def test_name_breaking_the_rule_is_400(client: FlaskClient, path: str) -> None:
    response = client.post(path)
    assert response.status_code == 400
    assert response.get_data() == BAD_NAME


def test_head_is_like_get_without_a_body(client: FlaskClient) -> None:
    get = client.get("/.netlify/functions/echo/h")
    head = client.head("/.netlify/functions/echo/h")
    assert get.status_code == head.status_code == 200
    assert get.get_data()
    assert head.get_data() == b""
    assert head.headers["X-Echo"] == "yes"
    # The length the body would have had (the echo names the method: one character more than GET's).
    assert head.headers.get("Content-Length") == str(len(get.get_data()) + 1)
    missing = client.head("/.netlify/functions/nope")
    assert (missing.status_code, missing.get_data()) == (404, b"")


@pytest.mark.parametrize("path", ["/.bgfn/", "/.bgfn/anything", "/.bgfn/no/such/thing", "/.bgfn/health/extra"])
@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
def test_bgfn_prefix_naming_nothing_is_a_json_404(client: FlaskClient, path: str, method: str) -> None:
    response = client.open(path, method=method)
    assert response.status_code == 404
    assert response.mimetype == "application/json"
    body = json.loads(response.get_data())
    assert set(body) == {"errorType", "errorMessage"}
    assert body["errorMessage"]


def test_routing_through_gunicorn(make_site: Callable[..., Path], start_server: Callable[..., str]) -> None:
    """What depends on the raw request line: the percent-encoded name, HEAD, unusual methods."""
    base = start_server(make_site(SITE))

    encoded = http(base, "GET", "/.netlify/functions/%65cho")
    assert (encoded.status, encoded.body) == (404, NOT_FOUND)
    encoded_sub = http(base, "POST", "/.netlify/functions/ech%6F/sub", body=b"x")
    assert (encoded_sub.status, encoded_sub.body) == (404, NOT_FOUND)
    bad = http(base, "GET", "/.netlify/functions/bad.name/x")
    assert (bad.status, bad.body) == (400, BAD_NAME)
    root = http(base, "GET", "/.netlify/functions/")
    assert (root.status, root.body) == (404, NOT_FOUND)

    path = "/.netlify/functions/echo/%C3%A9/a%2Fb//c/"
    for method in ["GET", "OPTIONS", "DELETE", "PROPFIND", "PURGE"]:
        answer = http(base, method, path + "?x=%2F")
        assert answer.status == 200, (method, answer.text)
        assert json.loads(answer.body) == {"path": path, "method": method}

    get = http(base, "GET", path)
    head = http(base, "HEAD", path)
    assert head.status == 200
    assert head.body == b""
    assert head.header("X-Echo") == "yes"
    assert head.header("Content-Length") == str(len(get.body) + 1)

    bgfn = http(base, "GET", "/.bgfn/anything")
    assert bgfn.status == 404
    assert (bgfn.header("Content-Type") or "").startswith("application/json")
    assert set(json.loads(bgfn.body)) == {"errorType", "errorMessage"}


REWRITES = """
    [functions]
    directory = "functions"

    [[redirects]]
    from = "/api/*"
    to = "/.netlify/functions/event/:splat"
    status = 200

    [[redirects]]
    from = "/users/:id/orders"
    to = "/.netlify/functions/event?user=:id"
    status = 200
"""

EVENT = """
    import json
    def handler(event, context):
        return {"statusCode": 200, "body": json.dumps(event)}
"""


def test_rewrites_to_functions_keep_the_original_path_and_query(make_site: Callable[..., Path],
                                                                 start_server: Callable[..., str]) -> None:
    base = start_server(make_site({"functions/event.py": EVENT}, REWRITES))
    splat = http(base, "GET", "/api/a/b?x=1&x=2")
    assert splat.status == 200, splat.text
    event = json.loads(splat.body)
    assert event["path"] == "/api/a/b"
    assert event["queryStringParameters"] == {"x": "1, 2"}
    placeholder = http(base, "POST", "/users/42/orders?page=3", body=b"{}",
                       headers=[("Content-Type", "application/json")])
    assert placeholder.status == 200, placeholder.text
    event = json.loads(placeholder.body)
    assert event["path"] == "/users/42/orders"
    assert event["httpMethod"] == "POST"
    assert event["queryStringParameters"] == {"page": "3"}  # the query of `to` is not added
    assert event["rawQuery"] == "page=3"
