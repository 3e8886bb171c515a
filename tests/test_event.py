"""CONTRACT §3 (the event) and §4 (the context)."""

from __future__ import annotations

import base64
import ipaddress
import json
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from tests.helpers import http

ECHO = """
    import json
    def handler(event, context):
        return {"statusCode": 200, "body": json.dumps(event)}
"""

CONTEXT = textwrap.dedent("""
    import json, time
    def handler(event, context):
        first = context.get_remaining_time_in_millis()
        started = time.monotonic()
        time.sleep(0.2)
        second = context.get_remaining_time_in_millis()
        elapsed = (time.monotonic() - started) * 1000
        return {"statusCode": 200, "body": json.dumps({
            "function_name": context.function_name,
            "aws_request_id": context.aws_request_id,
            "function_version": context.function_version,
            "invoked_function_arn": context.invoked_function_arn,
            "memory_limit_in_mb": context.memory_limit_in_mb,
            "log_group_name": context.log_group_name,
            "log_stream_name": context.log_stream_name,
            "identity": context.identity,
            "client_context": context.client_context,
            "functionName": context.functionName,
            "awsRequestId": context.awsRequestId,
            "clientContext": context.clientContext,
            "js_remaining": context.getRemainingTimeInMillis(),
            "py_remaining_after_js": context.get_remaining_time_in_millis(),
            "first": first,
            "second": second,
            "elapsed": elapsed,
        })}
""")


@pytest.fixture
def echo_client(make_site: Callable[..., Path], make_client: Callable[..., FlaskClient]) -> FlaskClient:
    return make_client(make_site({"functions/echo.py": ECHO}))


def event_of(client: FlaskClient, method: str = "GET", path: str = "/.netlify/functions/echo",
             **kwargs: Any) -> dict[str, Any]:
    response = client.open(path, method=method, **kwargs)
    assert response.status_code == 200, response.get_data(as_text=True)
    event: dict[str, Any] = json.loads(response.get_data())
    return event


# --- path, method, query, raw URL ---------------------------------------------------------------


def test_path_and_method_are_the_original_ones(echo_client: FlaskClient) -> None:
    event = event_of(echo_client, "PATCH", "/.netlify/functions/echo/a%20b/c/?x=1")
    assert event["path"] == "/.netlify/functions/echo/a%20b/c/"
    assert event["httpMethod"] == "PATCH"


def test_query_parameters_repeated_keys_joined_and_listed(echo_client: FlaskClient) -> None:
    event = event_of(echo_client, path="/.netlify/functions/echo?a=1&b=x%20y&a=2&c=")
    assert event["queryStringParameters"] == {"a": "1, 2", "b": "x y", "c": ""}
    assert event["multiValueQueryStringParameters"] == {"a": ["1", "2"], "b": ["x y"], "c": [""]}
    assert event["rawQuery"] == "a=1&b=x%20y&a=2&c="
    assert event["rawUrl"] == "http://localhost/.netlify/functions/echo?a=1&b=x%20y&a=2&c="


def test_no_query_gives_empty_dicts(echo_client: FlaskClient) -> None:
    event = event_of(echo_client, path="/.netlify/functions/echo/sub")
    assert event["queryStringParameters"] == {}
    assert event["multiValueQueryStringParameters"] == {}
    assert event["rawQuery"] == ""
    assert event["rawUrl"] == "http://localhost/.netlify/functions/echo/sub"


def test_raw_url_uses_scheme_and_host_header(echo_client: FlaskClient) -> None:
    event = event_of(echo_client, path="/.netlify/functions/echo/p%2Fq?z=%41",
                     base_url="https://example.com:8443")
    assert event["rawUrl"] == "https://example.com:8443/.netlify/functions/echo/p%2Fq?z=%41"
    assert event["rawQuery"] == "z=%41"
    assert event["queryStringParameters"] == {"z": "A"}


# --- headers -------------------------------------------------------------------------------------


def test_header_names_are_lower_cased(echo_client: FlaskClient) -> None:
    event = event_of(echo_client, headers={"X-Mixed-CASE": "Value Kept", "Accept": "a/b"})
    assert event["headers"]["x-mixed-case"] == "Value Kept"
    assert event["multiValueHeaders"]["x-mixed-case"] == ["Value Kept"]
    assert event["headers"]["accept"] == "a/b"
    for key in [*event["headers"], *event["multiValueHeaders"]]:
        assert key == key.lower()
    assert set(event["headers"]) == set(event["multiValueHeaders"])


# --- body ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
def test_body_is_none_without_a_body(echo_client: FlaskClient, method: str) -> None:
    assert event_of(echo_client, method)["body"] is None


def test_body_is_none_for_an_empty_body(echo_client: FlaskClient) -> None:
    event = event_of(echo_client, "POST", data=b"", content_type="application/json")
    assert event["body"] is None


@pytest.mark.parametrize("content_type", [
    "text/plain", "text/html; charset=utf-8", "TEXT/CSV", "application/json", "Application/JSON; charset=UTF-8",
    "application/javascript", "application/x-www-form-urlencoded", "application/xml", "application/graphql",
    "application/csp-report", "application/x-ndjson", "application/vnd.api+json", "image/svg+xml",
    "application/merge-patch+JSON ; q=1",
])
def test_text_content_types_give_text_bodies(echo_client: FlaskClient, content_type: str) -> None:
    event = event_of(echo_client, "POST", data="héllo {not json".encode(), headers={"Content-Type": content_type})
    assert event["isBase64Encoded"] is False
    assert event["body"] == "héllo {not json"


@pytest.mark.parametrize("content_type", [
    "application/octet-stream", "image/png", "application/pdf", "multipart/form-data; boundary=xyz",
    "application/jsonx", "application/json-seq", "application/xml-dtd", "texts/plain", "application/x-www-form",
])
def test_other_content_types_give_base64_bodies(echo_client: FlaskClient, content_type: str) -> None:
    raw = bytes(range(256))
    event = event_of(echo_client, "POST", data=raw, headers={"Content-Type": content_type})
    assert event["isBase64Encoded"] is True
    assert base64.b64decode(event["body"]) == raw


def test_body_without_content_type_arrives_base64(echo_client: FlaskClient) -> None:
    event = event_of(echo_client, "POST", data=b"plain words")
    assert "content-type" not in event["headers"]
    assert event["isBase64Encoded"] is True
    assert base64.b64decode(event["body"]) == b"plain words"


def test_bodies_are_never_parsed(echo_client: FlaskClient) -> None:
    invalid = event_of(echo_client, "POST", data=b'{"a": 1,,, oops', content_type="application/json")
    assert invalid["body"] == '{"a": 1,,, oops'
    form = event_of(echo_client, "POST", data=b"a=1&a=2&b=%20x+y", content_type="application/x-www-form-urlencoded")
    assert form["body"] == "a=1&a=2&b=%20x+y"
    assert form["queryStringParameters"] == {}
    multipart = (b"--xyz\r\nContent-Disposition: form-data; name=\"f\"\r\n\r\nvalue\r\n--xyz--\r\n")
    parts = event_of(echo_client, "POST", data=multipart, content_type="multipart/form-data; boundary=xyz")
    assert base64.b64decode(parts["body"]) == multipart


# --- client-ip -----------------------------------------------------------------------------------


def test_client_ip_is_the_peer_address(echo_client: FlaskClient) -> None:
    event = event_of(echo_client, environ_base={"REMOTE_ADDR": "203.0.113.7"},
                     headers={"X-Forwarded-For": "198.51.100.1", "Client-IP": "6.6.6.6"})
    assert event["headers"]["client-ip"] == "203.0.113.7"
    assert event["multiValueHeaders"]["client-ip"] == ["203.0.113.7"]


def test_forwarded_for_used_only_from_trusted_proxies(make_site: Callable[..., Path],
                                                     make_client: Callable[..., FlaskClient]) -> None:
    site = make_site({"functions/echo.py": ECHO})
    client = make_client(site, trusted_proxies=(ipaddress.ip_network("10.0.0.0/8"),))
    trusted = event_of(client, environ_base={"REMOTE_ADDR": "10.1.2.3"},
                       headers={"X-Forwarded-For": "6.6.6.6, 198.51.100.9, 10.0.0.2", "Client-IP": "6.6.6.6"})
    assert trusted["headers"]["client-ip"] == "198.51.100.9"
    untrusted = event_of(client, environ_base={"REMOTE_ADDR": "203.0.113.7"},
                         headers={"X-Forwarded-For": "198.51.100.9"})
    assert untrusted["headers"]["client-ip"] == "203.0.113.7"
    no_header = event_of(client, environ_base={"REMOTE_ADDR": "10.1.2.3"})
    assert no_header["headers"]["client-ip"] == "10.1.2.3"


# --- through gunicorn: repeated headers, client-ip from the socket, env BGFN_TRUSTED_PROXIES ------


def test_repeated_headers_through_gunicorn(make_site: Callable[..., Path], start_server: Callable[..., str]) -> None:
    base = start_server(make_site({"functions/echo.py": ECHO}))
    answer = http(base, "POST", "/.netlify/functions/echo/x?q=1&q=2", body=b'{"k": 1}', headers=[
        ("X-Rep", "one"), ("Accept", "text/plain"), ("x-rep", "two, three"), ("X-REP", "four"),
        ("Content-Type", "application/json"), ("Client-IP", "6.6.6.6"), ("X-Forwarded-For", "198.51.100.9"),
    ])
    assert answer.status == 200, answer.text
    event = json.loads(answer.body)
    assert event["multiValueHeaders"]["x-rep"] == ["one", "two, three", "four"]
    assert event["headers"]["x-rep"] == "one, two, three, four"
    assert event["headers"]["accept"] == "text/plain"
    assert event["multiValueHeaders"]["accept"] == ["text/plain"]
    assert event["headers"]["client-ip"] == "127.0.0.1"  # the peer; X-Forwarded-For from an untrusted peer
    assert event["multiValueHeaders"]["client-ip"] == ["127.0.0.1"]
    for key in [*event["headers"], *event["multiValueHeaders"]]:
        assert key == key.lower()
    assert event["path"] == "/.netlify/functions/echo/x"
    assert event["queryStringParameters"] == {"q": "1, 2"}
    assert event["rawUrl"] == f"{base}/.netlify/functions/echo/x?q=1&q=2"
    assert event["body"] == '{"k": 1}'
    assert event["isBase64Encoded"] is False


def test_trusted_proxies_from_the_environment(make_site: Callable[..., Path],
                                              start_server: Callable[..., str]) -> None:
    base = start_server(make_site({"functions/echo.py": ECHO}), BGFN_TRUSTED_PROXIES="127.0.0.1")
    answer = http(base, "GET", "/.netlify/functions/echo", headers=[("X-Forwarded-For", "198.51.100.9")])
    assert answer.status == 200, answer.text
    assert json.loads(answer.body)["headers"]["client-ip"] == "198.51.100.9"


# --- the context (§4) ----------------------------------------------------------------------------


def context_of(client: FlaskClient, name: str = "ctx-fn") -> dict[str, Any]:
    response = client.get(f"/.netlify/functions/{name}")
    assert response.status_code == 200, response.get_data(as_text=True)
    data: dict[str, Any] = json.loads(response.get_data())
    return data


def test_context_fields_and_javascript_aliases(make_site: Callable[..., Path],
                                               make_client: Callable[..., FlaskClient]) -> None:
    site = make_site({"functions/ctx-fn.py": CONTEXT + '\nconfig = {"timeout": 5}\n'})
    context = context_of(make_client(site))
    assert context["function_name"] == "ctx-fn"
    assert context["functionName"] == "ctx-fn"
    assert isinstance(context["aws_request_id"], str) and context["aws_request_id"]
    assert context["awsRequestId"] == context["aws_request_id"]
    assert context["clientContext"] == context["client_context"]
    for key in ("function_version", "invoked_function_arn", "log_group_name", "log_stream_name"):
        assert isinstance(context[key], str) and context[key], key
    assert int(context["memory_limit_in_mb"]) > 0
    assert "identity" in context and "client_context" in context
    # The JavaScript name reads the same clock: between two Python readings.
    assert context["second"] >= context["js_remaining"] >= context["py_remaining_after_js"]


def test_request_id_is_unique_per_invocation(make_site: Callable[..., Path],
                                             make_client: Callable[..., FlaskClient]) -> None:
    site = make_site({"functions/ids.py": """
        def handler(event, context):
            return {"statusCode": 200, "body": context.aws_request_id}
    """})
    client = make_client(site)
    ids = [client.get("/.netlify/functions/ids").get_data(as_text=True) for _ in range(20)]
    assert all(ids)
    assert len(set(ids)) == 20


@pytest.mark.parametrize(("config", "bgfn_toml", "timeout"), [
    ('config = {"timeout": 5}', None, 5.0),
    ("", '[functions."ctx-*"]\ntimeout = 7\n', 7.0),
    ("", None, 30.0),  # the default synchronous timeout
])
def test_remaining_time_counts_down_from_the_timeout(make_site: Callable[..., Path],
                                                     make_client: Callable[..., FlaskClient],
                                                     config: str, bgfn_toml: str | None, timeout: float) -> None:
    files = {"functions/ctx-fn.py": CONTEXT + "\n" + config + "\n"}
    if bgfn_toml is not None:
        files["bgfn.toml"] = bgfn_toml
    context = context_of(make_client(make_site(files)))
    limit = timeout * 1000
    assert limit - 1000 < context["first"] <= limit
    # It counts down in real time: the 0.2 s sleep shows up in the second reading.
    dropped = context["first"] - context["second"]
    assert context["elapsed"] - 50 <= dropped <= context["elapsed"] + 50
    assert dropped >= 150
