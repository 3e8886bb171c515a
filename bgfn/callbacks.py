"""Completion callbacks: when a job ends, POST its status JSON to the URL the caller named.

The body is the job's view (as GET /.bgfn/jobs/<id> answers it), signed with HMAC-SHA256 over
`"<timestamp>.<body>"` with the operator's secret, sent as

    X-Bgfn-Signature: t=<unix seconds>,v1=<hex digest>

Deliveries are RQ jobs on their own queue that depend on the invocation's job (so RQ enqueues
them when it ends, however it ends) and retry with backoff. Only hosts on the operator's
allowlist are called; with no allowlist there are no callbacks. Redirects are not followed.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from urllib.parse import urlsplit

from rq.job import get_current_job

SIGNATURE_HEADER = "X-Bgfn-Signature"
CALLBACK_HEADER = "X-Bgfn-Callback-Url"
DELIVERY_FUNCTION = "bgfn.callbacks.deliver"
DELIVERY_TIMEOUT = 10.0
"""How long one delivery attempt may take (seconds)."""


class CallbackRejected(ValueError):
    """The callback URL is not allowed; the message says why and how to fix it."""


class CallbackFailed(Exception):
    """The receiver did not answer 2xx; the delivery is retried."""


def sign(secret: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: str, header: str, body: bytes, tolerance: float = 300.0, now: float | None = None) -> bool:
    """Check a signature header as a receiver should: the digest, and the timestamp within `tolerance`."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), f"t={timestamp},v1={parts.get('v1', '')}")


def host_allowed(host: str, allowed: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(host.lower(), pattern.lower()) for pattern in allowed)


def check_url(url: str, allowed: Sequence[str], secret: str | None) -> str:
    """Return `url` if callbacks may go there, else raise :class:`CallbackRejected`."""
    if not allowed or not secret:
        raise CallbackRejected("completion callbacks are off on this server: the operator sets "
                               "BGFN_CALLBACK_HOSTS (allowed hosts) and BGFN_CALLBACK_SECRET to turn them on.")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CallbackRejected(f"callback URL {url[:200]!r} is not an http(s) URL with a host.")
    if parts.username or parts.password:
        raise CallbackRejected(f"callback URL {url[:200]!r} must not carry credentials.")
    if not host_allowed(parts.hostname, allowed):
        raise CallbackRejected(f"callback host {parts.hostname!r} is not allowed; allowed: "
                               f"{', '.join(allowed)} (BGFN_CALLBACK_HOSTS).")
    return url


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def post(url: str, body: bytes, secret: str, timeout: float = DELIVERY_TIMEOUT) -> int:
    """POST one signed delivery; returns the status, raises :class:`CallbackFailed` unless 2xx."""
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json",
        "User-Agent": "bgfn-callback",
        SIGNATURE_HEADER: sign(secret, int(time.time()), body),
    })
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=timeout) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        raise CallbackFailed(f"POST {url} failed: {exc}") from exc
    if not 200 <= status < 300:
        raise CallbackFailed(f"POST {url} answered {status}")
    return status


def deliver(job_id: str, url: str) -> int:
    """The RQ job that delivers one callback (runs on a worker, after the job ended)."""
    from bgfn import jobs
    from bgfn.worker import current_settings

    settings = current_settings()
    check_url(url, settings.callback_hosts, settings.callback_secret)
    current = get_current_job()
    assert current is not None, "deliver() runs as an RQ job"
    job = jobs.fetch(current.connection, job_id)
    body = json.dumps(jobs.view(job)).encode()
    assert settings.callback_secret is not None
    return post(url, body, settings.callback_secret)
