"""The baselines the benchmark compares bgfn with, in the same run.

- `python -m bench.baselines --site SITE --bind HOST:PORT`: a bare Flask app under gunicorn with
  bgfn's own gunicorn settings (:func:`bgfn.server.gunicorn_options`, so they cannot drift), minus
  bgfn's `pre_request` hook (it only feeds bgfn's app). Two endpoints:

  - `GET /noop`: the same status, content type and body as the `noop` function (the sync ceiling);
  - `POST /enqueue`: one RQ `enqueue_call` with the JSON serializer of a no-op job whose argument is
    the request body, answered 202 with the job id (the accept ceiling).

- :func:`noop` and :func:`stamp`: the jobs plain `rq worker` runs (the drain ceiling and the
  enqueue-to-start reference).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

BASELINE_QUEUE = "bench-baseline"
"""Queue the `/enqueue` endpoint stores into (no worker listens on it)."""


def noop(payload: Any = None) -> None:
    """A no-op job."""
    return None


def stamp(sample: str) -> None:
    """Record when this job started (time.time()) in the Redis hash `bench:rq-started`."""
    started = time.time()
    import redis

    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    try:
        client.hset("bench:rq-started", sample, repr(started))
    finally:
        client.close()


def baseline_options(site: Path, bind: str) -> dict[str, Any]:
    """gunicorn options of the baselines: bgfn's, computed for the same site and settings."""
    from bgfn.config import load_site
    from bgfn.discovery import load_registry
    from bgfn.server import gunicorn_options
    from bgfn.settings import Settings

    settings = Settings.load({"site": site, "bind": bind})
    registry, _ = load_registry(load_site(settings.site), settings)
    options = gunicorn_options(settings, registry)
    options.pop("pre_request", None)  # bgfn's hook for its own app (raw headers); nothing bare needs it
    options["proc_name"] = "bench-baseline"
    return options


def create_baseline_app(redis_url: str) -> Any:
    import redis
    from flask import Flask, Response, request
    from rq import Queue
    from rq.serializers import JSONSerializer

    app = Flask("bench-baseline")
    connection = redis.Redis.from_url(redis_url, socket_connect_timeout=5, socket_timeout=5)
    queue = Queue(BASELINE_QUEUE, connection=connection, serializer=JSONSerializer)

    @app.get("/noop")
    def _noop() -> Response:
        return Response("ok", status=200, content_type="text/plain; charset=utf-8")

    @app.post("/enqueue")
    def _enqueue() -> Response:
        job = queue.enqueue_call("bench.baselines.noop", args=(request.get_data(as_text=True),))
        return Response(b"", status=202, headers={"X-Job-Id": job.id})

    @app.get("/health")
    def _health() -> Response:
        return Response("ok", content_type="text/plain")

    return app


def main(argv: list[str] | None = None) -> None:
    from gunicorn.app.base import BaseApplication

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--site", type=Path, required=True, help="site whose settings bgfn's options use")
    parser.add_argument("--bind", required=True, help="HOST:PORT")
    args = parser.parse_args(argv)
    options = baseline_options(args.site, args.bind)
    redis_url = os.environ["REDIS_URL"]

    class Baseline(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            for key, value in options.items():
                if value is not None and key in self.cfg.settings:
                    self.cfg.set(key, value)

        def load(self) -> Any:
            return create_baseline_app(redis_url)

    Baseline().run()


if __name__ == "__main__":
    main()
