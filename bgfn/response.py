"""Turning a handler's return value into an HTTP answer (CONTRACT §5), and every JSON error body."""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.wrappers import Response

# Headers the server owns: a function's values would corrupt the framing of the answer.
SERVER_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive", "upgrade",
                            "proxy-connection", "te", "trailer"})
TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# What HTTP (and gunicorn) accept in a header value: visible Latin-1 text, spaces and tabs.
HEADER_VALUE = re.compile(r"^[ \t\x21-\x7e\x80-\xff]*$")
NO_BODY_STATUSES = frozenset({204, 304})  # CONTRACT §5: these send no body


class InvalidResponse(Exception):
    """The handler returned something that is not a valid response; the message says what."""


class BareAnswer:
    """A finished answer as a WSGI app: its status, its header pairs exactly as sent (Content-Length
    included) and its body. A function's answer and a 202 are this: ~1 µs to build and send, where
    werkzeug's Response spent ~25 µs on fix-ups these need none of (header lookups, working the
    length out, making `Location` IRI-safe); ~10 % of a small sync call's CPU under gunicorn
    (py-spy). Flask takes it as a view's return value too."""

    __slots__ = ("status_code", "headers", "body")

    def __init__(self, status_code: int, headers: list[tuple[str, str]], body: bytes = b"") -> None:
        self.status_code = status_code
        self.headers = headers
        self.body = body

    @property
    def status(self) -> str:
        """The status line's text, as werkzeug words it ("418 I'M A TEAPOT", "599 UNKNOWN")."""
        return f"{self.status_code} {HTTP_STATUS_CODES.get(self.status_code, 'Unknown').upper()}"

    def get_data(self) -> bytes:
        return self.body

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response(self.status, self.headers)
        return [self.body]


def error_response(status: int, error_type: str, message: str, *, trace: list[str] | None = None,
                   headers: Mapping[str, str] | None = None) -> Response:
    """The one place a JSON error body is built: `{"errorType", "errorMessage"[, "trace"]}`."""
    payload: dict[str, Any] = {"errorType": error_type, "errorMessage": message}
    if trace is not None:
        payload["trace"] = trace
    response = Response(json.dumps(payload), status=status, mimetype="application/json")
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def text_response(status: int, text: str) -> Response:
    """A plain-text answer (the CLI's 404 and 400 bodies)."""
    return Response(text, status=status, mimetype="text/plain")


def _header_text(name: str, value: Any) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int | float):
        text = str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
    elif isinstance(value, str):
        text = value
    else:
        raise InvalidResponse(f"Your function response headers must be strings, numbers or booleans. "
                              f"Header {name!r} has: {value!r}")
    if "\r" in text or "\n" in text or "\0" in text:
        raise InvalidResponse(f"Your function response header {name!r} contains a line break: {text!r}")
    if not HEADER_VALUE.match(text):
        raise InvalidResponse(f"Your function response header {name!r} has characters HTTP cannot carry in a "
                              f"header (control characters, or text beyond Latin-1): {text!r}")
    return text


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not TOKEN.match(name):
        raise InvalidResponse(f"Your function response has an invalid header name: {name!r}")
    return name


def map_response(result: Any, *, head: bool = False) -> BareAnswer:
    """Build the answer for a handler's return value, or raise :class:`InvalidResponse`."""
    if result is None:
        raise InvalidResponse("lambda response was None. check your function code again")
    if type(result) is not dict and not isinstance(result, Mapping):  # the ABC check only for non-dicts
        raise InvalidResponse(f"Your function response must be an object (a dict). You gave: {result!r}")
    status = result.get("statusCode")
    if isinstance(status, float) and status.is_integer():
        status = int(status)
    if not isinstance(status, int) or isinstance(status, bool):
        raise InvalidResponse(f"Your function response must have a numerical statusCode. You gave: {status!r}")
    if not 100 <= status <= 599:
        raise InvalidResponse(f"Your function response must have a statusCode between 100 and 599. "
                              f"You gave: {status!r}")
    if status < 200:  # an informational status is not a final answer: the client would wait forever
        raise InvalidResponse(f"Your function response must have a final statusCode (200 to 599); 1xx codes are "
                              f"informational and cannot end a response. You gave: {status!r}")
    body = result.get("body")
    if body is not None and not isinstance(body, str):
        raise InvalidResponse(f"Your function response must have a string body. You gave: {body!r}")
    data = b""
    if body:
        if result.get("isBase64Encoded"):
            try:
                data = base64.b64decode(body, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidResponse("Your function response has isBase64Encoded set but its body is not "
                                      "valid base64.") from None
        else:
            data = body.encode("utf-8")

    pairs: dict[str, list[tuple[str, str]]] = {}
    headers = result.get("headers") or {}
    multi = result.get("multiValueHeaders") or {}
    if not isinstance(headers, Mapping):
        raise InvalidResponse(f"Your function response headers must be an object. You gave: {headers!r}")
    if not isinstance(multi, Mapping):
        raise InvalidResponse(f"Your function response multiValueHeaders must be an object. You gave: {multi!r}")
    for name, value in headers.items():
        pairs[_check_name(name).lower()] = [(name, _header_text(name, value))]
    for name, values in multi.items():
        if not isinstance(values, list | tuple):
            raise InvalidResponse(f"Your function response multiValueHeaders must map names to lists. "
                                  f"Header {name!r} has: {values!r}")
        pairs[_check_name(name).lower()] = [(name, _header_text(name, v)) for v in values]

    kept = [pair for lowered, items in pairs.items() if lowered not in SERVER_HEADERS for pair in items]
    if status in NO_BODY_STATUSES:
        return BareAnswer(status, kept)  # no body, and no length either
    kept.append(("Content-Length", str(len(data))))  # a HEAD answer states the GET body's length
    return BareAnswer(status, kept, b"" if head else data)
