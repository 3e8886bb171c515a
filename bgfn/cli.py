"""The `bgfn` command line. The only place that turns bgfn's exceptions into exit codes."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from bgfn import defaults, environment
from bgfn.config import SiteConfig, load_site
from bgfn.discovery import Registry, load_registry, shown_path
from bgfn.errors import BgfnError, ConfigError, FunctionLoadError, FunctionNotFound, QueueUnavailable, RedisServerError
from bgfn.event import build_event
from bgfn.invoke import Invoker
from bgfn.queue import new_request_id
from bgfn.response import InvalidResponse, map_response
from bgfn.settings import SETTINGS, Settings

EXIT_CODES: dict[type[BgfnError], int] = {
    ConfigError: 2,
    FunctionNotFound: 2,
    FunctionLoadError: 3,
    QueueUnavailable: 4,
    RedisServerError: 5,
}


class BgfnClickError(click.ClickException):
    """A bgfn error on its way out of the CLI, with the exit code for its kind."""

    def __init__(self, error: BgfnError) -> None:
        super().__init__(str(error))
        code = next((code for cls, code in EXIT_CODES.items() if isinstance(error, cls)), 1)
        self.exit_code = code  # type: ignore[misc]  # click declares it on the class


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except BgfnError as exc:
        raise BgfnClickError(exc) from None


def _settings(ctx: click.Context, **flags: Any) -> Settings:
    return Settings.load({"site": ctx.obj.get("site"), **flags})


def _load(settings: Settings) -> tuple[SiteConfig, Registry]:
    site = load_site(settings.site)
    apply_site_environment(site, settings)
    registry, _ = load_registry(site, settings)
    return site, registry


def apply_site_environment(site: SiteConfig, settings: Settings) -> list[str]:
    """Set the site's [build.environment] and [context.NAME.environment] where the process has none."""
    file = site.config_file.name if site.config_file else "netlify.toml"
    return environment.apply(environment.site_environment(site.raw, settings.context, file))


def _setup_logging(settings: Settings) -> None:
    from bgfn import logs

    logs.setup(settings.log_level, settings.log_format)


def _settings_help() -> str:
    return "\n".join(f"  {s.env:<24} {s.help}" for s in SETTINGS)


@click.group(epilog="Settings (environment; flags win over them):\n\n" + _settings_help())
@click.option("--site", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Site folder holding netlify.toml [env BGFN_SITE; default: current folder].")
@click.version_option(package_name="bgfn")
@click.pass_context
def main(ctx: click.Context, site: Path | None) -> None:
    """bgfn: Netlify-style functions on your own machines."""
    ctx.obj = {"site": site}


def _common(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--redis-url", default=None, help="Redis URL [env REDIS_URL].")(fn)
    fn = click.option("--queue", default=None, help=f"RQ queue name [env BGFN_QUEUE; default {defaults.QUEUE}].")(fn)
    fn = click.option("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR [env BGFN_LOG_LEVEL].")(fn)
    return fn


@main.command()
@click.option("--bind", "-b", default=None, help=f"HOST:PORT to listen on [env BGFN_BIND; default {defaults.BIND}].")
@click.option("--workers", "-w", "web_workers", type=int, default=None,
              help=f"gunicorn worker processes [env BGFN_WEB_WORKERS; default {defaults.WEB_WORKERS}].")
@click.option("--threads", "web_threads", type=int, default=None,
              help=f"threads per worker process [env BGFN_WEB_THREADS; default {defaults.WEB_THREADS}].")
@_common
@click.pass_context
def serve(ctx: click.Context, **flags: Any) -> None:
    """Serve the functions over HTTP with gunicorn."""
    from bgfn.server import GunicornServer

    with _errors():
        settings = _settings(ctx, **flags)
        _check_counts(settings)
        _setup_logging(settings)
        site, registry = _load(settings)
        background = [f.name for f in registry if f.background]
        if background and not settings.redis_url:
            raise ConfigError(f"REDIS_URL is not set, but background functions need Redis "
                              f"({', '.join(background)}). Set REDIS_URL=redis://HOST:PORT/0, or run "
                              "`bgfn dev`, which starts an embedded Redis.")
        for warning in registry.warnings:
            logging.getLogger("bgfn").warning("%s", warning)
    GunicornServer(settings, registry, list(site.rewrites)).run()


def _check_counts(settings: Settings) -> None:
    for name, value in (("--workers", settings.web_workers), ("--threads", settings.web_threads),
                        ("--processes", settings.worker_processes)):
        if value < 1:
            raise ConfigError(f"option {name} is {value}: expected a whole number >= 1.")


@main.command()
@click.option("--processes", "-n", "worker_processes", type=int, default=None,
              help=f"RQ worker processes [env BGFN_WORKER_PROCESSES; default {defaults.WORKER_PROCESSES}].")
@click.option("--burst", is_flag=True, help="Run the jobs waiting now, then exit.")
@_common
@click.pass_context
def worker(ctx: click.Context, burst: bool, **flags: Any) -> None:
    """Run RQ workers for background functions."""
    from bgfn.queue import connect
    from bgfn.worker import run_workers

    with _errors():
        settings = _settings(ctx, **flags)
        _check_counts(settings)
        _setup_logging(settings)
        if not settings.redis_url:
            raise ConfigError("REDIS_URL is not set: workers take jobs from Redis. Set "
                              "REDIS_URL=redis://HOST:PORT/0 (the same as the web server's).")
        _, registry = _load(settings)
        connection = connect(settings.redis_url)
        run_workers(settings, registry, connection, burst=burst)


@main.command()
@_common
@click.pass_context
def scheduler(ctx: click.Context, **flags: Any) -> None:
    """Enqueue scheduled functions at their ticks (each tick once, however many schedulers run)."""
    import signal
    import threading

    from bgfn.queue import connect, make_queue
    from bgfn.scheduler import Scheduler

    with _errors():
        settings = _settings(ctx, **flags)
        _setup_logging(settings)
        if not settings.redis_url:
            raise ConfigError("REDIS_URL is not set: the scheduler stores each tick as a job in Redis. Set "
                              "REDIS_URL=redis://HOST:PORT/0 (the same as the workers').")
        _, registry = _load(settings)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        Scheduler(registry, make_queue(connect(settings.redis_url), settings.queue),
                  result_ttl=settings.result_ttl, failure_ttl=settings.failure_ttl).run(stop)


@main.command()
@click.option("--bind", "-b", default=None, help=f"HOST:PORT to listen on [default {defaults.BIND}].")
@click.option("--redis-url", default=None, help="Redis URL; without one an embedded Redis is started.")
@click.pass_context
def dev(ctx: click.Context, **flags: Any) -> None:
    """Web + worker (+ embedded Redis), reloaded when functions change."""
    from bgfn.dev import DevSupervisor

    with _errors():
        settings = _settings(ctx, **flags)
        settings = settings.replace(dev=True, context=settings.context if "BGFN_CONTEXT" in os.environ else "dev")
        site, registry = _load(settings)  # fail fast on broken functions
        for warning in registry.warnings:
            click.echo(f"warning: {warning}", err=True)
        DevSupervisor(settings, site).run()


@main.command()
@click.pass_context
def check(ctx: click.Context) -> None:
    """Load every function and report every problem at once."""
    with _errors():
        settings = _settings(ctx)
        site = load_site(settings.site)
        applied = apply_site_environment(site, settings)
        registry, problems = load_registry(site, settings, collect=True)
    click.echo(f"config: {site.config_file or '(none)'}")
    click.echo(f"functions directory: {site.functions_dir or '(none)'} ({site.functions_dir_source})")
    click.echo(f"context: {settings.context}; environment set from the site: {', '.join(applied) or '(none)'}")
    for rewrite in site.rewrites:
        click.echo(f"rewrite: {rewrite.source} -> {rewrite.to}")
    for function in registry:
        click.echo(f"ok: {function.name} ({function.kind}, timeout {function.timeout:g} s)")
    for warning in registry.warnings:
        click.echo(f"warning: {warning}")
    for problem in problems:
        click.echo(f"error: {problem}")
    if problems:
        raise BgfnClickError(FunctionLoadError(problems))
    click.echo(f"{len(registry)} function{'s' if len(registry) != 1 else ''} ok")


@main.command("list")
@click.pass_context
def list_functions(ctx: click.Context) -> None:
    """List the functions: name, kind, file."""
    with _errors():
        settings = _settings(ctx)
        site, registry = _load(settings)
    import time
    from datetime import UTC, datetime

    from bgfn.scheduler import next_tick

    def when(schedule: str) -> str:
        tick = datetime.fromtimestamp(next_tick(schedule, time.time()), UTC)
        return f"{schedule} (next {tick.isoformat().replace('+00:00', 'Z')})"

    rows = [(f.name, "scheduled" if f.settings.get("schedule") else f.kind, shown_path(f.path, site.site_dir),
             when(f.settings["schedule"]) if f.settings.get("schedule") else "") for f in registry]
    width = max([len(r[0]) for r in rows] + [4])
    paths = max([len(r[2]) for r in rows] + [4])
    scheduled = any(r[3] for r in rows)
    click.echo(f"{'NAME':<{width}}  {'KIND':<10}  " + (f"{'FILE':<{paths}}  SCHEDULE" if scheduled else "FILE"))
    for name, kind, path, schedule in rows:
        click.echo(f"{name:<{width}}  {kind:<10}  " + (f"{path:<{paths}}  {schedule}" if scheduled else path))


@main.command()
@click.argument("name")
@click.option("--method", "-X", default=None, help="HTTP method [default GET, or POST with --data].")
@click.option("--data", "-d", default=None, help="Request body (text); @FILE reads a file.")
@click.option("--header", "-H", "headers", multiple=True, help="'Name: value' header; repeatable.")
@click.option("--path", "subpath", default="", help="Sub-path after the function name, e.g. /items/1.")
@click.option("--query", default="", help="Query string, e.g. 'a=1&b=2'.")
@click.pass_context
def invoke(ctx: click.Context, name: str, method: str | None, data: str | None, headers: tuple[str, ...],
           subpath: str, query: str) -> None:
    """Call one function in-process and print its answer, like curl -i without a server."""
    with _errors():
        settings = _settings(ctx)
        _, registry = _load(settings)
        function = registry.get(name)
        body = _read_data(data)
        pairs = []
        for header in headers:
            key, sep, value = header.partition(":")
            if not sep or not key.strip():
                raise ConfigError(f"--header {header!r}: expected 'Name: value'.")
            pairs.append((key.strip(), value.strip()))
        if body is not None and not any(k.lower() == "content-type" for k, _ in pairs):
            pairs.append(("content-type", "text/plain"))
        path = f"/.netlify/functions/{name}" + ("/" + subpath.lstrip("/") if subpath else "")
        event = build_event(method=(method or ("POST" if body is not None else "GET")).upper(), path=path,
                            query=query.lstrip("?"), headers=[("host", "localhost"), *pairs], body=body,
                            scheme="http", host="localhost", client_ip="127.0.0.1")
        outcome = Invoker().invoke(function, event, new_request_id())
    if not outcome.ok:
        click.echo(json.dumps({"errorType": outcome.error_type, "errorMessage": outcome.error_message}))
        if outcome.trace:
            click.echo("".join(outcome.trace), err=True)
        sys.exit(1)
    if function.background:
        click.echo(f"background function {name} returned: {json.dumps(outcome.value, default=repr)}")
        return
    try:
        response = map_response(outcome.value, head=event["httpMethod"] == "HEAD")
    except InvalidResponse as exc:
        click.echo(json.dumps({"errorType": "InvalidResponse", "errorMessage": str(exc)}))
        sys.exit(1)
    click.echo(f"HTTP {response.status}")
    for key, value in response.headers:
        click.echo(f"{key}: {value}")
    click.echo("")
    sys.stdout.flush()
    sys.stdout.buffer.write(response.get_data())
    sys.stdout.buffer.flush()


def _read_data(data: str | None) -> bytes | None:
    if data is None:
        return None
    if data.startswith("@"):
        try:
            return Path(data[1:]).read_bytes()
        except OSError as exc:
            raise ConfigError(f"--data {data!r}: cannot read the file ({exc}).") from None
    return data.encode("utf-8")


def _job_queue(ctx: click.Context, redis_url: str | None, queue: str | None) -> Any:
    from bgfn.queue import connect, make_queue

    settings = _settings(ctx, redis_url=redis_url, queue=queue)
    if not settings.redis_url:
        raise ConfigError("REDIS_URL is not set: jobs live in Redis. Set REDIS_URL=redis://HOST:PORT/0 "
                          "(the same as the server's), or pass --redis-url.")
    return make_queue(connect(settings.redis_url), settings.queue)


def _jobs_errors() -> Any:
    from bgfn import jobs
    from bgfn.queue import REDIS_ERRORS

    @contextmanager
    def handle() -> Iterator[None]:
        try:
            with _errors():
                yield
        except jobs.JobNotFound as exc:
            raise click.ClickException(f"no job has id {str(exc)!r} (unknown, or its record expired).") from None
        except jobs.JobStateError as exc:
            raise click.ClickException(str(exc)) from None
        except REDIS_ERRORS as exc:
            raise BgfnClickError(QueueUnavailable(f"Redis is unreachable: {exc}")) from None

    return handle()


def _job_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--redis-url", default=None, help="Redis URL [env REDIS_URL].")(fn)
    fn = click.option("--queue", default=None, help=f"RQ queue [env BGFN_QUEUE; default {defaults.QUEUE}].")(fn)
    return fn


def _subcommand_queue(ctx: click.Context, redis_url: str | None, queue: str | None) -> Any:
    """The queue of a `bgfn jobs` subcommand: its own --redis-url/--queue, else the group's."""
    return _job_queue(ctx, redis_url or ctx.obj.get("redis_url"), queue or ctx.obj.get("queue"))


@main.group(invoke_without_command=True)
@click.option("--function", "-f", default=None, help="Only this function's jobs.")
@click.option("--state", "-s", "states", multiple=True,
              type=click.Choice(["queued", "scheduled", "running", "succeeded", "failed", "canceled"]),
              help="Only jobs in this state (repeatable).")
@click.option("--limit", default=20, show_default=True, help="Most jobs listed per state.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_job_options
@click.pass_context
def jobs(ctx: click.Context, function: str | None, states: tuple[str, ...], limit: int, as_json: bool,
         redis_url: str | None, queue: str | None) -> None:
    """List recent and failed background jobs; subcommands show, retry and purge them."""
    ctx.obj["redis_url"], ctx.obj["queue"] = redis_url, queue
    if ctx.invoked_subcommand is not None:
        return
    from bgfn import jobs as jobs_api

    with _jobs_errors():
        q = _job_queue(ctx, redis_url, queue)
        listed = jobs_api.list_jobs(q, function=function, states=states or jobs_api.STATES, limit=limit)
        summary = None if as_json else jobs_api.queue_summary(q)
    if summary is None:
        click.echo(json.dumps(listed, indent=2))
        return
    oldest = f"{summary['oldest_age']:.1f} s" if summary["oldest_age"] is not None else "-"
    click.echo(f"queue {summary['queue']}: {summary['depth']} waiting, oldest waited {oldest}")
    for name, figures in sorted(summary["functions"].items()):
        if function is None or name == function:
            click.echo(f"  {name}: {figures['waiting']} waiting to start, {figures['refused']} refused")
    click.echo("")
    click.echo(f"{'ID':<36}  {'FUNCTION':<24}  {'STATE':<9}  {'TRIES':<5}  {'ACCEPTED':<27}  ERROR")
    for job in listed:
        error = job.get("error") or {}
        tries = f"{job['attempts']}/{job['max_attempts']}"
        reason = f"{error.get('type', '')}: {error.get('message', '')}"[:80] if error else ""
        click.echo(f"{job['id']:<36}  {str(job['function'])[:24]:<24}  {job['state']:<9}  {tries:<5}  "
                   f"{str(job['accepted_at']):<27}  {reason}")
    if not listed:
        click.echo("(no jobs)")


@jobs.command("show")
@click.argument("job_id")
@_job_options
@click.pass_context
def jobs_show(ctx: click.Context, job_id: str, redis_url: str | None, queue: str | None) -> None:
    """Print one job's record as JSON (as GET /.bgfn/jobs/ID answers it)."""
    from bgfn import jobs as jobs_api

    with _jobs_errors():
        q = _subcommand_queue(ctx, redis_url, queue)
        click.echo(json.dumps(jobs_api.view(jobs_api.fetch(q.connection, job_id), q), indent=2))


@jobs.command("retry")
@click.argument("job_id", required=False)
@click.option("--function", "-f", default=None, help="Replay every failed job of this function.")
@click.option("--all-failed", is_flag=True, help="Replay every failed job of every function.")
@_job_options
@click.pass_context
def jobs_retry(ctx: click.Context, job_id: str | None, function: str | None, all_failed: bool,
               redis_url: str | None, queue: str | None) -> None:
    """Replay a failed (or canceled) job, or all failed jobs of a function, with a fresh retry budget."""
    from bgfn import jobs as jobs_api

    if sum(bool(x) for x in (job_id, function, all_failed)) != 1:
        raise click.UsageError("name one job ID, or --function NAME, or --all-failed.")
    with _jobs_errors():
        q = _subcommand_queue(ctx, redis_url, queue)
        if job_id:
            job = jobs_api.replay(q, jobs_api.fetch(q.connection, job_id))
            click.echo(f"{job['id']}: {job['state']}")
            return
        replayed = jobs_api.replay_failed(q, function)
    for replayed_id in replayed:
        click.echo(f"{replayed_id}: queued")
    click.echo(f"{len(replayed)} job{'s' if len(replayed) != 1 else ''} queued again")


@jobs.command("purge")
@click.option("--function", "-f", default=None, help="Only this function's jobs.")
@click.option("--state", "-s", "states", multiple=True, type=click.Choice(["succeeded", "failed", "canceled"]),
              help="Only jobs in this state (repeatable) [default: all three].")
@_job_options
@click.pass_context
def jobs_purge(ctx: click.Context, function: str | None, states: tuple[str, ...], redis_url: str | None,
               queue: str | None) -> None:
    """Delete the records of finished jobs (succeeded, failed, canceled)."""
    from bgfn import jobs as jobs_api

    with _jobs_errors():
        q = _subcommand_queue(ctx, redis_url, queue)
        count = jobs_api.purge(q, function=function, states=states or ("succeeded", "failed", "canceled"))
    click.echo(f"{count} job record{'s' if count != 1 else ''} deleted")
