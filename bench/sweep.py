"""gunicorn's process and thread counts for `bgfn serve`, measured (README, "Benchmarks": Counts).

    .venv/bin/python -m bench.sweep [--rounds 2] [--duration 4] [--configs 2x4,2x2,2x8,3x4,4x2,1x8]

Starts Valkey, then for each configuration a `bgfn serve` with BGFN_WEB_WORKERS and BGFN_WEB_THREADS
set, and measures with the suite's own load generator and `Suite.measure`: sync req/s at 1, 16 and
64 connections, background accept req/s and 202 p99 at 16 connections, 202 p50 at 1 connection.
Each round goes through the configurations, every other round in reverse order; one line per
configuration and round, then a Markdown table with every round's value (no medians: with two
rounds and a noisy machine, the spread is the information).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from bench.run import ACCEPT_PATH, FULL, SYNC_PATH, LoadGen, Plan, Suite

COLUMNS = {
    "sync req/s, 1 conn": ("sync", 1, "rps"),
    "sync req/s, 16 conn": ("sync", 16, "rps"),
    "sync req/s, 64 conn": ("sync", 64, "rps"),
    "accept req/s, 16 conn": ("accept", 16, "rps"),
    "accept 202 p99 ms, 16 conn": ("accept", 16, "p99_ms"),
    "accept 202 p50 ms, 1 conn": ("accept", 1, "p50_ms"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=int, default=4, help="seconds per load measurement")
    parser.add_argument("--configs", default="2x4,2x2,2x8,3x4,4x2,1x8", help="PROCESSESxTHREADS,...")
    args = parser.parse_args(argv)
    configs = [tuple(int(n) for n in item.split("x")) for item in args.configs.split(",")]
    plan = Plan(**{**asdict(FULL), "runs": 1, "duration": args.duration})
    workdir = Path(tempfile.mkdtemp(prefix="bgfn-sweep-"))

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    suite = Suite(plan, LoadGen("auto"), workdir, log)
    results: dict[tuple[int, ...], list[dict[str, float]]] = {config: [] for config in configs}
    suite.start_redis()
    try:
        for round_ in range(args.rounds):
            for config in (configs if round_ % 2 == 0 else list(reversed(configs))):
                processes, threads = config
                proc, port, _ = suite.start_bgfn_serve(f"sweep-{processes}x{threads}",
                                                       BGFN_WEB_WORKERS=str(processes), BGFN_WEB_THREADS=str(threads))
                suite.loadgen.run(port, SYNC_PATH, 16, 1)  # warm-up
                measured = {}
                for column, (kind, connections, key) in COLUMNS.items():
                    if kind == "sync":
                        figure = suite.measure(port, SYNC_PATH, connections)
                    else:
                        figure = suite.measure(port, ACCEPT_PATH, connections, method="POST", body="bench")
                    measured[column] = float(figure[key])
                suite.stack.stop(proc)
                suite.flush()
                results[config].append(measured)
                log(f"{processes} x {threads} (round {round_ + 1}): "
                    + ", ".join(f"{k} {v:.2f}" for k, v in measured.items()))
    finally:
        suite.stack.stop_all()
        if suite.redis_server is not None:
            suite.redis_server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print("| processes x threads | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for config, rounds in results.items():
        cells = [" / ".join(f"{r[column]:.2f}" if "ms" in column else f"{r[column]:.0f}" for r in rounds)
                 for column in COLUMNS]
        print(f"| {config[0]} x {config[1]} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
