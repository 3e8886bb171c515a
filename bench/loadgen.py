"""A small HTTP/1.1 keep-alive load generator: the fallback when `wrk` is not installed.

Runs in its own process (asyncio, one socket per connection, no HTTP library on the hot path) and
prints the same `BENCHJSON {...}` line as bench/wrk.lua, so bench/run.py reads either. It is far
slower than wrk; bench/run.py says in its output which one was used.

    python -m bench.loadgen URL --connections 16 --duration 5 [--method POST --body TEXT]
                            [--stop-after N] [--mix-every K --mix-path /path] [--burst]

With --burst it prints bench/burst.lua's line instead (`BENCHBURST {...}`: answers by status and the
Retry-After values of the refusals) and writes the job id of every 202 to --ids-file, one a line,
for the backpressure figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from urllib.parse import urlsplit


def _request(method: str, host: str, path: str, body: str | None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    data = b""
    if body is not None:
        data = body.encode()
        lines += ["Content-Type: text/plain", f"Content-Length: {len(data)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


class Stats:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors = 0
        self.status_errors = 0
        self.sent = 0
        self.stop = False
        self.statuses: dict[str, int] = {}
        self.retry_after: dict[str, int] = {}
        self.ids: list[str] = []


async def _connection(host: str, port: int, main: bytes, mix: bytes | None, mix_every: int, stats: Stats,
                      deadline: float, stop_after: int) -> None:
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        stats.errors += 1
        return
    try:
        while not stats.stop and time.perf_counter() < deadline:
            stats.sent += 1
            payload = mix if mix is not None and stats.sent % mix_every == 0 else main
            began = time.perf_counter()
            writer.write(payload)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
                elif name.strip().lower() == b"retry-after":
                    key = value.strip().decode()
                    stats.retry_after[key] = stats.retry_after.get(key, 0) + 1
                elif name.strip().lower() == b"x-bgfn-job-id" and status == 202:
                    stats.ids.append(value.strip().decode())
            stats.statuses[str(status)] = stats.statuses.get(str(status), 0) + 1
            if length:
                await reader.readexactly(length)
            stats.latencies.append(time.perf_counter() - began)
            if status >= 400:
                stats.status_errors += 1
            if stop_after and len(stats.latencies) >= stop_after:
                stats.stop = True
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
        stats.errors += 1
    finally:
        writer.close()


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def run(url: str, connections: int, duration: float, method: str, body: str | None, stop_after: int,
              mix_every: int, mix_path: str | None) -> dict[str, object]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    main = _request(method, f"{host}:{port}", parts.path or "/", body)
    mix = _request("POST", f"{host}:{port}", mix_path, "bench") if mix_every and mix_path else None
    stats = Stats()
    began = time.perf_counter()
    deadline = began + (duration if not stop_after else 24 * 3600)
    await asyncio.gather(*(_connection(host, port, main, mix, mix_every, stats, deadline, stop_after)
                           for _ in range(connections)))
    elapsed = time.perf_counter() - began
    ordered = sorted(stats.latencies)
    ms = 1000.0
    return {"requests": len(ordered), "duration_s": elapsed, "errors": stats.errors,
            "status_errors": stats.status_errors, "p50_ms": _percentile(ordered, 50) * ms,
            "p90_ms": _percentile(ordered, 90) * ms, "p99_ms": _percentile(ordered, 99) * ms,
            "max_ms": (ordered[-1] if ordered else 0.0) * ms,
            "mean_ms": (sum(ordered) / len(ordered) if ordered else 0.0) * ms,
            "statuses": stats.statuses, "retry_after": stats.retry_after, "ids": stats.ids}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="HTTP/1.1 keep-alive load generator (wrk fallback)")
    parser.add_argument("url")
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--method", default="GET")
    parser.add_argument("--body", default=None)
    parser.add_argument("--stop-after", type=int, default=0)
    parser.add_argument("--mix-every", type=int, default=0)
    parser.add_argument("--mix-path", default=None)
    parser.add_argument("--burst", action="store_true", help="print the backpressure burst's BENCHBURST line")
    parser.add_argument("--ids-file", default=None, help="with --burst: where to write the 202s' job ids")
    args = parser.parse_args(argv)
    result = asyncio.run(run(args.url, args.connections, args.duration, args.method, args.body, args.stop_after,
                             args.mix_every, args.mix_path))
    if args.burst:
        ids = result["ids"]
        if args.ids_file and isinstance(ids, list):
            with open(args.ids_file, "a") as file:
                file.writelines(f"{job_id}\n" for job_id in ids)
        print("BENCHBURST " + json.dumps({k: result[k] for k in ("requests", "duration_s", "errors", "statuses",
                                                                  "retry_after")}), flush=True)
        return
    print("BENCHJSON " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
