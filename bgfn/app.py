"""The web tier: a Flask app that routes `/.netlify/functions/NAME` to functions (CONTRACT §2–7)."""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from types import ModuleType
from typing import Any, TypeAlias
from urllib.parse import quote, urlsplit

import redis
from flask import Flask, request
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Rule
from werkzeug.wrappers import Request, Response
from werkzeug.wsgi import get_content_length, get_host

from bgfn import admin, defaults, idempotency, stats
from bgfn.admin import status_url
from bgfn.callbacks import CALLBACK_HEADER, CallbackRejected, check_url
from bgfn.discovery import NAME_RULE, Function, Registry
from bgfn.errors import QueueUnavailable
from bgfn.event import build_event
from bgfn.invoke import Invoker, timeout_message
from bgfn.limits import Limits, Refusal
from bgfn.queue import REDIS_ERRORS, BgfnQueue, enqueue_invocation, make_queue, new_request_id
from bgfn.redirects import Rewrite
from bgfn.redirects import match as match_rewrite
from bgfn.response import BareAnswer, InvalidResponse, error_response, map_response, text_response
from bgfn.settings import Settings

log = logging.getLogger("bgfn.app")

FUNCTIONS_PREFIX = "/.netlify/functions/"
BGFN_PREFIX = "/.bgfn/"
NOT_FOUND_TEXT = "Function not found..."
BAD_NAME_TEXT = "Function name should consist only of alphanumeric characters, hyphen & underscores."
JOB_ID_HEADER = "X-Bgfn-Job-Id"
REFUSAL_REASONS = {400: "bad_request", 409: "idempotency_conflict", 413: "too_large", 429: "queue_full",
                   503: "redis_unavailable"}
REPEAT_HEADER = "X-Bgfn-Idempotent-Replay"
IDEMPOTENCY_HEADER = "Idempotency-Key"
IDEMPOTENCY_ENVIRON = "HTTP_IDEMPOTENCY_KEY"
CALLBACK_ENVIRON = "HTTP_" + CALLBACK_HEADER.upper().replace("-", "_")

Answer: TypeAlias = Response | BareAnswer
"""What a function call is answered with: werkzeug's Response, or the cheaper bodiless answer of a 202."""

# Set per request by the gunicorn hook (bgfn.server): the raw header list and the worker.
request_local = threading.local()


@dataclass
class BgfnState:
    """What the app needs per process; lives on `app.extensions["bgfn"]`."""

    settings: Settings
    registry: Registry
    invoker: Invoker
    redis: redis.Redis | None
    queue: BgfnQueue | None
    metrics: ModuleType
    limits: Limits | None = None
    rewrites: list[Rewrite] = field(default_factory=list)
    sync_slots: dict[str, threading.BoundedSemaphore] = field(default_factory=dict)


def create_app(settings: Settings, registry: Registry, connection: redis.Redis | None = None,
               on_stuck: Callable[[Function], None] | None = None, rewrites: list[Rewrite] | None = None) -> Flask:
    """Build the Flask app serving `registry`. Background functions need `connection`."""
    app = Flask("bgfn")
    app.url_map.merge_slashes = False
    app.url_map.strict_slashes = False
    from bgfn import metrics  # imported late: `bgfn serve` first picks prometheus-client's storage

    queue = make_queue(connection, settings.queue) if connection is not None else None
    state = BgfnState(settings=settings, registry=registry, invoker=Invoker(on_stuck=on_stuck),
                      redis=connection, queue=queue, metrics=metrics,
                      limits=Limits(connection, settings) if connection is not None else None,
                      rewrites=list(rewrites or []))
    for function in registry:
        if not function.background and function.settings.get("sync_concurrency"):
            state.sync_slots[function.name] = threading.BoundedSemaphore(function.settings["sync_concurrency"])
    app.extensions["bgfn"] = state

    # Rules with methods=None match every method, OPTIONS and unusual ones included.
    # Calls under /.netlify/functions/ are answered by FunctionCalls before Flask; this rule only
    # sees the bare folder (`/.netlify/functions`), a function-not-found like an empty name.
    app.url_map.add(Rule("/.netlify/functions/", endpoint="function"))
    app.view_functions["function"] = lambda: text_response(404, NOT_FOUND_TEXT)
    app.url_map.add(Rule("/", endpoint="rewrite"))
    app.url_map.add(Rule("/<path:rest>", endpoint="rewrite"))
    app.view_functions["rewrite"] = lambda rest="": _rewrite_view(state)
    app.add_url_rule("/.bgfn/health", "health", lambda: {"status": "ok"})
    app.add_url_rule("/.bgfn/ready", "ready", lambda: _ready_view(state))
    admin.register(app, state)
    app.add_url_rule("/.bgfn/metrics", "metrics", lambda: _metrics_view(state))

    @app.errorhandler(404)
    def _not_found(_: Exception) -> Response:
        return error_response(404, "NotFound", f"Nothing is served at {request.path!r}. Functions live under "
                              f"{FUNCTIONS_PREFIX}NAME; bgfn's own endpoints under {BGFN_PREFIX}.")

    @app.errorhandler(405)
    def _not_allowed(_: Exception) -> Response:
        return error_response(405, "MethodNotAllowed", f"{request.method} is not allowed on {request.path!r}.")

    app.wsgi_app = FunctionCalls(state, app.wsgi_app)  # type: ignore[method-assign]
    return app


class FunctionCalls:
    """WSGI middleware in front of Flask (installed as `app.wsgi_app`): a request under
    /.netlify/functions/ is answered here; every other one goes on to Flask.

    Flask's per-request machinery (request context, URL adapter and matching, signals, teardown)
    cost more per call than bare Flask's whole request (README, "Benchmarks"), and a function call needs
    none of it: its route is one prefix, and bgfn answers every error itself with a JSON body."""

    def __init__(self, state: BgfnState, flask_app: Callable[..., Any]) -> None:
        self.state = state
        self.flask_app = flask_app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if not environ.get("PATH_INFO", "").startswith(FUNCTIONS_PREFIX):
            return self.flask_app(environ, start_response)
        path = _raw_path(environ)
        try:
            response = _dispatch(self.state, _function_name(path), environ, path)
        except HTTPException as exc:  # werkzeug's bounded stream: the client went away mid-body
            response = error_response(exc.code or 400, type(exc).__name__, f"The request to {path!r} could not be "
                                      f"read: {exc.description} Send it again, complete.")
        except OSError:
            raise  # the same under gunicorn (its NoMoreData): gunicorn drops the connection, nobody to answer
        except Exception:
            log.exception("bgfn failed to answer %s %s", environ.get("REQUEST_METHOD"), path)
            response = error_response(500, "InternalServerError", f"bgfn failed to answer {path!r}; the server log "
                                      "has the trace. This is a bug in bgfn: please report it.")
        return response(environ, start_response)


def _raw_path(environ: dict[str, Any]) -> str:
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw:
        path = urlsplit(raw).path if "://" in raw else raw.split("?", 1)[0]
        if path:
            return path
    return quote(environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""), safe="/:@!$&'()*+,;=-._~")


def _raw_headers(environ: dict[str, Any]) -> list[tuple[str, str]]:
    """The request's header pairs with repeats kept (from gunicorn), else rebuilt from the environ."""
    raw = getattr(request_local, "headers", None)
    if raw is not None:  # set by bgfn.server's pre_request hook for this very request
        return [(name, value) for name, value in raw]
    pairs: list[tuple[str, str]] = []
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            pairs.append((key[5:].replace("_", "-").lower(), value))
        elif key in ("CONTENT_TYPE", "CONTENT_LENGTH") and value:
            pairs.append((key.replace("_", "-").lower(), value))
    return pairs


def _client_ip(environ: dict[str, Any], settings: Settings) -> str:
    peer = str(environ.get("REMOTE_ADDR") or "")
    forwarded = environ.get("HTTP_X_FORWARDED_FOR")
    if not forwarded or not settings.trusted_proxies or not _trusted(peer, settings):
        return peer
    hops = [h.strip() for h in forwarded.split(",") if h.strip()]
    for hop in reversed(hops):  # the first address from the right that is not one of our proxies
        if not _trusted(hop, settings):
            return hop
    return hops[0] if hops else peer


def _trusted(address: str, settings: Settings) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in settings.trusted_proxies)


def _rewrite_view(state: BgfnState) -> Answer:
    """Any other path: a `[[redirects]]` rewrite to a function, or 404."""
    path = _raw_path(request.environ)
    target = match_rewrite(state.rewrites, path)
    if target is None:
        return error_response(404, "NotFound", f"Nothing is served at {request.path!r}. Functions live under "
                              f"{FUNCTIONS_PREFIX}NAME; bgfn's own endpoints under {BGFN_PREFIX}.")
    return _dispatch(state, _function_name(target), request.environ, path)  # it sees the original path


def _function_name(path: str) -> str:
    """The NAME of /.netlify/functions/NAME[/...] ("" for any other path)."""
    return path[len(FUNCTIONS_PREFIX):].split("/", 1)[0] if path.startswith(FUNCTIONS_PREFIX) else ""


def _dispatch(state: BgfnState, name: str, environ: dict[str, Any], path: str) -> Answer:
    if name and "%" not in name and not NAME_RULE.match(name):
        return text_response(400, BAD_NAME_TEXT)
    function = state.registry.functions.get(name)
    if function is None or (function.settings.get("schedule") and not state.settings.dev):
        return text_response(404, NOT_FOUND_TEXT)  # scheduled functions answer HTTP only in development
    request_id = new_request_id()
    started = time.perf_counter()
    response = _invoke(state, function, environ, path, request_id)
    _observe(state, function, request_id, response, time.perf_counter() - started)
    return response


def _observe(state: BgfnState, function: Function, request_id: str, response: Answer, seconds: float) -> None:
    """Count the invocation and write its one log line (the request id is the job id of a 202)."""
    status = response.status_code
    reason = None
    if function.background and status != 202:
        reason = getattr(response, "bgfn_reason", None) or REFUSAL_REASONS.get(status, str(status))
    state.metrics.observe_invocation(function.name, function.kind, status, seconds, reason)
    log.info("invocation %s %s %s -> %d in %.1f ms", function.name, function.kind, request_id, status,
             seconds * 1000, extra={"event": "invocation", "function": function.name, "kind": function.kind,
                                    "request_id": request_id, "status": status,
                                    "duration_ms": round(seconds * 1000, 3)})


def _invoke(state: BgfnState, function: Function, environ: dict[str, Any], path: str,
            request_id: str) -> Answer:
    limit = defaults.BACKGROUND_BODY_LIMIT if function.background else defaults.SYNC_BODY_LIMIT
    if environ.get("CONTENT_LENGTH", "") in ("", "0") and "HTTP_TRANSFER_ENCODING" not in environ:
        body = b""  # nothing to read (most GETs): werkzeug's stream wrapper would find the same
    else:
        if environ.get("wsgi.input_terminated"):
            # gunicorn's input ends where the body does (chunked bodies decoded): werkzeug would read it
            # as it is too, after ~25 µs of building its Request around it
            stream, length = environ["wsgi.input"], get_content_length(environ)
        else:
            req = Request(environ)  # werkzeug's: a bounded stream, chunked bodies included
            stream, length = req.stream, req.content_length
        if length is not None and length > limit:
            return _too_large(function, length, limit)
        body = stream.read(limit + 1)
        if len(body) > limit:
            return _too_large(function, None, limit)

    scheme = environ.get("wsgi.url_scheme", "http")
    event = build_event(method=environ.get("REQUEST_METHOD", "GET").upper(), path=path,
                        query=environ.get("QUERY_STRING", ""), headers=_raw_headers(environ), body=body,
                        scheme=scheme, host=get_host(environ), client_ip=_client_ip(environ, state.settings))
    if function.background:
        return _accept_background(state, function, event, request_id, environ)
    return _run_sync(state, function, event, request_id, environ.get("gunicorn.socket"))


def _too_large(function: Function, length: int | None, limit: int) -> Response:
    size = f"{length} bytes" if length is not None else f"over {limit} bytes"
    kind = "background" if function.background else "synchronous"
    return error_response(413, "PayloadTooLarge", f"The request body is {size}; {kind} function "
                          f"{function.name!r} accepts at most {limit} bytes ({_human(limit)}). Send a smaller body.")


def _human(size: int) -> str:
    return f"{size // (1024 * 1024)} MiB" if size >= 1024 * 1024 else f"{size // 1024} KiB"


def _run_sync(state: BgfnState, function: Function, event: dict[str, Any], request_id: str,
              sock: socket.socket | None) -> Answer:
    slots = state.sync_slots.get(function.name)
    if slots is None:
        return _run_sync_unlimited(state, function, event, request_id, sock)
    if not slots.acquire(blocking=False):
        limit = function.settings["sync_concurrency"]
        return error_response(429, "TooManyRequests", f"{function.name!r} already runs {limit} calls in this web "
                              f"process (its sync_concurrency is {limit}); try again shortly.",
                              headers={"Retry-After": "1"})
    try:
        return _run_sync_unlimited(state, function, event, request_id, sock)
    finally:
        slots.release()


def _answer_timeout(sock: socket.socket, function: Function, head: bool) -> None:
    """Answer a request `502 TimeoutError` on the client's socket (gunicorn's), from the watchdog,
    while the handler is still stuck in the request thread (bgfn.invoke)."""
    response = error_response(502, "TimeoutError", timeout_message(function.timeout))
    body = response.get_data()
    lines = [f"HTTP/1.1 {response.status}", f"Content-Type: {response.content_type}",
             f"Content-Length: {len(body)}", "Connection: close", "", ""]
    sock.sendall("\r\n".join(lines).encode("latin-1") + (b"" if head else body))
    sock.shutdown(socket.SHUT_RDWR)


def _run_sync_unlimited(state: BgfnState, function: Function, event: dict[str, Any], request_id: str,
                        sock: socket.socket | None) -> Answer:
    head = event["httpMethod"] == "HEAD"
    answer_early = partial(_answer_timeout, sock, function, head) if sock is not None else None
    outcome = state.invoker.invoke(function, event, request_id, answer_early)
    if outcome.timed_out:
        return error_response(502, "TimeoutError", outcome.error_message or "")
    if not outcome.ok:
        log.error("function %s (request %s) raised %s: %s\n%s", function.name, request_id, outcome.error_type,
                  outcome.error_message, "".join(outcome.trace or []))
        return error_response(502, outcome.error_type or "Error", outcome.error_message or "",
                              trace=outcome.trace if state.settings.dev else None)
    try:
        return map_response(outcome.value, head=head)
    except InvalidResponse as exc:
        log.error("function %s (request %s) returned a bad response: %s", function.name, request_id, exc)
        return error_response(500, "InvalidResponse", str(exc))


def _unavailable(function: Function, reason: object) -> Response:
    return error_response(
        503, "ServiceUnavailable",
        f"The background invocation of {function.name!r} was not stored: {reason}. Nothing was queued; "
        f"send it again after {defaults.RETRY_AFTER} seconds.",
        headers={"Retry-After": str(defaults.RETRY_AFTER)})


def _accepted(job_id: str, *, repeat: bool = False) -> BareAnswer:
    headers = [("Content-Length", "0"), (JOB_ID_HEADER, job_id), ("Location", status_url(job_id))]
    if repeat:
        headers.append((REPEAT_HEADER, "true"))
    return BareAnswer(202, headers)


def _accept_background(state: BgfnState, function: Function, event: dict[str, Any],
                       request_id: str, environ: dict[str, Any]) -> Answer:
    settings = state.settings
    callback_url = environ.get(CALLBACK_ENVIRON)
    if callback_url is not None:
        try:
            check_url(callback_url.strip(), settings.callback_hosts, settings.callback_secret)
        except CallbackRejected as exc:
            return error_response(400, "CallbackRejected", f"{exc} Nothing was queued.")
    key = environ.get(IDEMPOTENCY_ENVIRON)
    if state.queue is None:
        return _unavailable(function, "this server has no Redis connection (set REDIS_URL)")
    try:
        if key is not None:
            holder = idempotency.claim(state.queue.connection, function.name, key, request_id,
                                       settings.idempotency_window)
            if holder is not None:
                if idempotency.wait_stored(state.queue.connection, holder, defaults.IDEMPOTENCY_WAIT):
                    return _accepted(holder, repeat=True)
                return error_response(409, "IdempotencyConflict", f"A request with Idempotency-Key {key[:60]!r} "
                                      "is still being stored; send it again in a moment.",
                                      headers={"Retry-After": "1"})
        refusal = state.limits.check(function) if state.limits is not None else None
        if refusal is not None:
            if key is not None:
                idempotency.release(state.queue.connection, function.name, key, request_id)
            return _refused(state, function, refusal)
        enqueue_invocation(state.queue, function, event, request_id,
                           callback_url=callback_url.strip() if callback_url else None,
                           result_ttl=settings.result_ttl, failure_ttl=settings.failure_ttl)
    except idempotency.IdempotencyKeyError as exc:
        return error_response(400, "BadIdempotencyKey", str(exc))
    except (QueueUnavailable, *REDIS_ERRORS) as exc:
        log.error("background %s (request %s) refused: %s", function.name, request_id, exc)
        if key is not None:
            try:
                idempotency.release(state.queue.connection, function.name, key, request_id)
            except REDIS_ERRORS:
                pass
        return _unavailable(function, exc)
    if state.limits is not None:
        state.limits.accepted(function)
    return _accepted(request_id)


def _refused(state: BgfnState, function: Function, refusal: Refusal) -> Response:
    assert state.queue is not None
    stats.record(state.queue.connection, function.name, event="refused")
    response = error_response(429, refusal.error_type, f"{refusal.message} The invocation of {function.name!r} was "
                              f"not stored; send it again after {refusal.retry_after} seconds.",
                              headers={"Retry-After": str(refusal.retry_after)})
    response.bgfn_reason = refusal.error_type  # type: ignore[attr-defined]
    return response


def _metrics_view(state: BgfnState) -> Response:
    refused = admin.authorize(state)
    if refused is not None:
        return refused
    try:
        body, content_type = state.metrics.render(state.redis, [state.settings.queue])
    except REDIS_ERRORS as exc:
        return error_response(503, "ServiceUnavailable", f"Redis is unreachable, so job metrics cannot be read: "
                              f"{exc}", headers={"Retry-After": str(defaults.RETRY_AFTER)})
    return Response(body, content_type=content_type)


def _ready_view(state: BgfnState) -> Response:
    if state.redis is None:
        return error_response(503, "NotReady", "No Redis configured: set REDIS_URL.")
    try:
        state.redis.ping()
    except REDIS_ERRORS as exc:
        return error_response(503, "NotReady", f"Redis is unreachable: {exc}",
                              headers={"Retry-After": str(defaults.RETRY_AFTER)})
    return Response(json.dumps({"status": "ready", "functions": len(state.registry)}), mimetype="application/json")
