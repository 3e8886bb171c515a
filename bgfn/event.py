"""The event and the context a handler receives (CONTRACT §3 and §4)."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl

TEXT_CONTENT_TYPES = frozenset({
    "application/json", "application/javascript", "application/x-www-form-urlencoded", "application/xml",
    "application/graphql", "application/csp-report", "application/x-ndjson",
})


def is_text_content_type(content_type: str | None) -> bool:
    """Whether a body of this content type is passed as text (else base64), per CONTRACT §3."""
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return (media.startswith("text/") or media.endswith(("+json", "+xml")) or media in TEXT_CONTENT_TYPES)


def build_event(*, method: str, path: str, query: str, headers: Iterable[tuple[str, str]],
                body: bytes | None, scheme: str, host: str, client_ip: str) -> dict[str, Any]:
    """Build the event dict from the parts of a request.

    `headers` are the request's header pairs in arrival order, repeats included; `path` and
    `query` are as the client sent them (not decoded).
    """
    multi_headers: dict[str, list[str]] = {}
    for name, value in headers:
        lowered = name.lower()
        if lowered == "client-ip":
            continue  # set by the server below, never taken from the client
        multi_headers.setdefault(lowered, []).append(value)
    multi_headers["client-ip"] = [client_ip]
    multi_query: dict[str, list[str]] = {}
    if query:
        for key, value in parse_qsl(query, keep_blank_values=True):
            multi_query.setdefault(key, []).append(value)
    content_type = multi_headers.get("content-type", [None])[0]
    is_text = is_text_content_type(content_type)
    if not body:
        body_value: str | None = None
    elif is_text:
        body_value = body.decode("utf-8", errors="replace")
    else:
        body_value = base64.b64encode(body).decode("ascii")
    return {
        "path": path,
        "httpMethod": method,
        "headers": {k: ", ".join(v) for k, v in multi_headers.items()},
        "multiValueHeaders": multi_headers,
        "queryStringParameters": {k: ", ".join(v) for k, v in multi_query.items()},
        "multiValueQueryStringParameters": multi_query,
        "body": body_value,
        "isBase64Encoded": not is_text,
        "rawUrl": f"{scheme}://{host}{path}" + (f"?{query}" if query else ""),
        "rawQuery": query,
    }


class LambdaContext:
    """The context object, with AWS Lambda's Python names and the CLI's JavaScript aliases."""

    function_version = "$LATEST"
    memory_limit_in_mb = 1024
    identity: Any = None
    client_context: Any = None

    def __init__(self, function_name: str, request_id: str, timeout: float,
                 started: float | None = None) -> None:
        self.function_name = function_name
        self.aws_request_id = request_id
        self.invoked_function_arn = f"arn:bgfn:function:{function_name}"
        self.log_group_name = f"/bgfn/functions/{function_name}"
        self._created = time.time()
        self._deadline = (time.monotonic() if started is None else started) + timeout

    @property
    def log_stream_name(self) -> str:
        """As Lambda's: the invocation's UTC date, then the request id (made when first read)."""
        return f"{time.strftime('%Y/%m/%d', time.gmtime(self._created))}/[$LATEST]{self.aws_request_id}"

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))

    # The CLI's JavaScript names for the same fields.
    @property
    def functionName(self) -> str:  # noqa: N802
        return self.function_name

    @property
    def awsRequestId(self) -> str:  # noqa: N802
        return self.aws_request_id

    @property
    def clientContext(self) -> Any:  # noqa: N802
        return self.client_context

    def getRemainingTimeInMillis(self) -> int:  # noqa: N802
        return self.get_remaining_time_in_millis()

    def __repr__(self) -> str:
        return f"<LambdaContext function_name={self.function_name!r} aws_request_id={self.aws_request_id!r}>"
