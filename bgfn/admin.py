"""bgfn's job endpoints under /.bgfn/: the public status URL of each job, and the admin API.

- `GET /.bgfn/jobs/<id>`: the job's JSON view; `DELETE` cancels it (the unguessable id is the
  capability, as for the 202's `Location`).
- `/.bgfn/admin/...`: listing, replay and purge, behind `Authorization: Bearer <BGFN_ADMIN_TOKEN>`.
  With no token configured the admin endpoints do not exist (404).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flask import Flask, jsonify, request
from rq import Queue
from werkzeug.wrappers import Response

from bgfn import defaults, jobs
from bgfn.queue import REDIS_ERRORS
from bgfn.response import error_response

if TYPE_CHECKING:
    from bgfn.app import BgfnState

JOBS_PREFIX = "/.bgfn/jobs/"


class BadQuery(ValueError):
    """A query parameter bgfn cannot use (answered 400)."""


def status_url(job_id: str) -> str:
    return JOBS_PREFIX + job_id


def _redis_down(exc: Exception) -> Response:
    return error_response(503, "ServiceUnavailable", f"Redis is unreachable: {exc}. Try again later.",
                          headers={"Retry-After": str(defaults.RETRY_AFTER)})


def _with_queue(state: BgfnState, action: Callable[[Queue], Response]) -> Response:
    if state.queue is None:
        return error_response(503, "ServiceUnavailable", "This server has no Redis connection: set REDIS_URL.")
    try:
        return action(state.queue)
    except jobs.JobNotFound as exc:
        return error_response(404, "JobNotFound", f"No job has id {str(exc)[:100]!r} (unknown, or its record "
                              "expired).")
    except jobs.JobStateError as exc:
        return error_response(409, "JobStateConflict", str(exc))
    except BadQuery as exc:
        return error_response(400, "BadRequest", str(exc))
    except REDIS_ERRORS as exc:
        return _redis_down(exc)


def authorize(state: BgfnState) -> Response | None:
    """None when the request carries the admin token; else the answer to send."""
    token = state.settings.admin_token
    if not token:
        return error_response(404, "NotFound", "The admin endpoints are off: the operator sets BGFN_ADMIN_TOKEN "
                              "to turn them on.")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        return error_response(401, "Unauthorized", "Send the admin token as 'Authorization: Bearer <token>'.",
                              headers={"WWW-Authenticate": 'Bearer realm="bgfn"'})
    return None


def _limit() -> int:
    try:
        return max(1, min(1000, int(request.args.get("limit", "50"))))
    except ValueError:
        return 50


def _states(default: tuple[str, ...]) -> tuple[str, ...]:
    """The `state` parameter (comma-separated), each one of `default`; `default` when absent."""
    raw = request.args.get("state")
    if not raw:
        return default
    states = tuple(s.strip() for s in raw.split(",") if s.strip())
    unknown = [s for s in states if s not in default]
    if unknown:
        raise BadQuery(f"state={raw[:100]!r}: unknown or not allowed here: {', '.join(unknown)}; "
                       f"use one or more of {', '.join(default)}.")
    return states


def register(app: Flask, state: BgfnState) -> None:
    """Add the job and admin endpoints to `app`."""

    def job_status(job_id: str) -> Response:
        if request.method == "DELETE":
            return _with_queue(state, lambda q: jsonify(jobs.cancel(q, jobs.fetch(q.connection, job_id),
                                                                    state.settings.callback_retry_delays)))
        return _with_queue(state, lambda q: jsonify(jobs.view(jobs.fetch(q.connection, job_id), q)))

    def admin(action: Callable[..., Any]) -> Callable[..., Response]:
        def view(**kwargs: str) -> Response:
            refused = authorize(state)
            if refused is not None:
                return refused
            return _with_queue(state, lambda q: jsonify(action(q, **kwargs)))
        return view

    def list_jobs(queue: Queue) -> dict[str, Any]:
        listed = jobs.list_jobs(queue, function=request.args.get("function"), states=_states(jobs.STATES),
                                limit=_limit())
        return {"jobs": listed}

    def show(queue: Queue, job_id: str) -> dict[str, Any]:
        return jobs.view(jobs.fetch(queue.connection, job_id), queue)

    def retry_one(queue: Queue, job_id: str) -> dict[str, Any]:
        return jobs.replay(queue, jobs.fetch(queue.connection, job_id))

    def retry_failed(queue: Queue) -> dict[str, Any]:
        return {"retried": jobs.replay_failed(queue, request.args.get("function"))}

    def purge(queue: Queue) -> dict[str, Any]:
        states = _states(("succeeded", "failed", "canceled"))
        return {"purged": jobs.purge(queue, function=request.args.get("function"), states=states)}

    app.add_url_rule(JOBS_PREFIX + "<job_id>", "job_status", job_status, methods=["GET", "DELETE"])
    app.add_url_rule("/.bgfn/admin/jobs", "admin_jobs", admin(list_jobs), methods=["GET"])
    app.add_url_rule("/.bgfn/admin/jobs/retry", "admin_retry_failed", admin(retry_failed), methods=["POST"])
    app.add_url_rule("/.bgfn/admin/jobs/purge", "admin_purge", admin(purge), methods=["POST"])
    app.add_url_rule("/.bgfn/admin/jobs/<job_id>", "admin_job", admin(show), methods=["GET"])
    app.add_url_rule("/.bgfn/admin/jobs/<job_id>/retry", "admin_retry", admin(retry_one), methods=["POST"])
