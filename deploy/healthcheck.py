"""Container health check for every bgfn process: one script, whichever command the container runs.

The image has one HEALTHCHECK, but the command picks the process (`bgfn serve`, `bgfn worker`,
`bgfn scheduler`), so this script finds the bgfn process in the container and checks what fits it:

- `serve` (and `dev`): GET /.bgfn/health on the port it listens on (its `--bind`, else BGFN_BIND,
  else bgfn's default); healthy on 200. Liveness only: Redis is the readiness probe's business
  (/.bgfn/ready), and a web process that cannot reach Redis still serves synchronous functions.
- `worker` and `scheduler` (no HTTP port): the process is running and Redis (REDIS_URL) answers
  PING within the time limit, with the redis client installed in the image. A worker that cannot
  reach Redis cannot take jobs; a restart also gets a fresh DNS lookup after a Redis failover.
- any other command (`check`, `list`, ...): a one-shot command; healthy while it runs.

Which process: the lowest PID whose command line is `bgfn ...` (`python -m bgfn ...` too), which is
PID 1 when the image runs with its exec-form ENTRYPOINT, or the child of `docker run --init`'s init.
BGFN_HEALTHCHECK_PID names the process instead (the tests use it: outside a container other bgfn
processes may run). A role given as the first argument (`healthcheck.py worker`) skips the search
for the command; the process must still exist.

Exit status 0 healthy, 1 unhealthy (Docker's convention); the reason goes to stdout, which Docker
keeps in `docker inspect`'s health log. Standard library plus `redis` only; Python 3.11+.
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path

TIMEOUT = 3.0
"""Seconds an HTTP request or a Redis PING may take (below the HEALTHCHECK's --timeout)."""

DEFAULT_BIND = "127.0.0.1:8888"
COMMANDS = {"serve", "worker", "scheduler", "dev", "check", "list", "invoke", "jobs"}
OPTIONS_WITH_VALUE = {"--site"}


def parse_command(argv: list[str]) -> tuple[str, list[str]] | None:
    """(command, its arguments) when `argv` runs bgfn, else None."""
    start = None
    for index, arg in enumerate(argv[:4]):  # python [-u] /path/bin/bgfn | python -m bgfn
        if Path(arg).name == "bgfn" or (arg == "bgfn" and index > 0 and argv[index - 1] == "-m"):
            start = index + 1
            break
    if start is None:
        return None
    rest = argv[start:]
    index = 0
    while index < len(rest):
        arg = rest[index]
        if arg in OPTIONS_WITH_VALUE:
            index += 2
            continue
        if arg.startswith("-"):
            index += 1
            continue
        return (arg, rest[index + 1:]) if arg in COMMANDS else None
    return None


def cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part] or None


def find_process() -> tuple[int, str, list[str]] | None:
    """(pid, command, arguments) of the container's bgfn process."""
    override = os.environ.get("BGFN_HEALTHCHECK_PID", "").strip()
    if override:
        pids = [int(override)]
    else:
        pids = sorted(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
    for pid in pids:
        argv = cmdline(pid)
        parsed = parse_command(argv) if argv else None
        if parsed is not None:
            return pid, parsed[0], parsed[1]
    return None


def option(args: list[str], *names: str) -> str | None:
    """The value of the last `--name VALUE` / `--name=VALUE` / `-b VALUE` among `args`."""
    value = None
    for index, arg in enumerate(args):
        for name in names:
            if arg == name and index + 1 < len(args):
                value = args[index + 1]
            elif arg.startswith(name + "="):
                value = arg[len(name) + 1:]
    return value


def health_url(args: list[str]) -> str:
    bind = option(args, "--bind", "-b") or os.environ.get("BGFN_BIND", "").strip() or DEFAULT_BIND
    host, _, port = bind.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "*"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/.bgfn/health"


def check_web(args: list[str]) -> str | None:
    url = health_url(args)
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:  # noqa: S310 - a fixed local URL
            if response.status == 200:
                return None
            return f"{url} answered {response.status}"
    except (urllib.error.URLError, OSError) as exc:
        return f"{url}: {exc}"


def check_redis(args: list[str]) -> str | None:
    url = option(args, "--redis-url") or os.environ.get("REDIS_URL", "").strip()
    if not url:
        return "REDIS_URL is not set"
    import redis  # the image's redis client (bgfn depends on it)

    client = redis.Redis.from_url(url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT)
    try:
        client.ping()
    except (redis.exceptions.RedisError, OSError) as exc:
        return f"Redis at {redis_location(url)} does not answer PING: {exc}"
    finally:
        client.close()
    return None


def redis_location(url: str) -> str:
    """host:port of a Redis URL, without its password."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 6379}" if parts.hostname else "(unix socket)"


def main(argv: list[str]) -> int:
    found = find_process()
    if found is None:
        print("unhealthy: no bgfn process found")
        return 1
    pid, command, args = found
    if len(argv) > 1:
        command = argv[1]
    if command in ("serve", "dev"):
        problem = check_web(args)
    elif command in ("worker", "scheduler"):
        problem = check_redis(args)
    else:
        problem = None
    if problem:
        print(f"unhealthy: bgfn {command} (pid {pid} on {socket.gethostname()}): {problem}")
        return 1
    print(f"healthy: bgfn {command} (pid {pid})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
