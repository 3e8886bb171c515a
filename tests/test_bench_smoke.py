"""The benchmark suite's smoke mode end to end, so bench/ does not rot.

Nothing is timed here: it asserts that every figure is in the JSON, never what it is.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, bgfn_env

FIGURES = [
    *(f"sync.c{c}.{side}.{m}" for c in (1, 16, 64) for side in ("bgfn", "flask") for m in ("rps", "p50_ms", "p99_ms")),
    *(f"accept.c{c}.{side}.{m}" for c in (1, 16) for side in ("bgfn", "rq_enqueue")
      for m in ("rps", "p50_ms", "p99_ms")),
    "drain.bgfn.jobs_per_s", "drain.rq.jobs_per_s",
    "start_latency.bgfn.p50_ms", "start_latency.bgfn.p99_ms", "start_latency.rq.p50_ms",
    "cold_start.bgfn.s", "cold_start.flask.s",
]
RATIOS = ["sync.c1.rps", "sync.c16.rps", "sync.c64.rps", "accept.c1.rps", "accept.c16.rps", "drain.jobs_per_s"]
TARGETS = {"sync_vs_flask_c16", "accept_vs_enqueue_c16", "accept_vs_enqueue_c1", "time_to_202_p50", "drain_vs_rq",
           "start_p50", "memory_web", "memory_worker"}


@pytest.mark.timeout(90)
def test_bench_smoke_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--out", str(out)], cwd=ROOT, env=bgfn_env(),
                          capture_output=True, text=True, timeout=85)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "targets" in done.stdout and "sync invoke, 16 conn" in done.stdout
    result = json.loads(out.read_text())
    assert result["meta"]["smoke"] is True and result["meta"]["loadgen_name"] in ("wrk", "python")
    assert result["meta"]["gunicorn"]["worker_class"] == "bgfn.webworker.LingeringWorker"
    for name in FIGURES:
        stats = result["figures"][name]
        assert set(stats) >= {"median", "min", "max"}, name
    for name in RATIOS:
        assert "median" in result["ratios"][name], name
    assert {t["name"] for t in result["targets"]} == TARGETS
    assert all(isinstance(t["pass"], bool) for t in result["targets"])
    for kind in ("web", "worker"):
        assert {"before_mib", "after_mib", "growth_pct"} <= set(result["memory"][kind])
    assert result["memory"]["requests"] > 0
    burst = result["backpressure"]
    assert {"accepted_per_s", "refused_per_s", "drain_per_s", "peak_depth", "retry_after_s"} <= set(burst)
    assert {"before", "peak"} <= set(burst["redis_used_mib"]) and "median" in burst["retry_after_s"]
    assert burst["accepted"] > 0 and burst["every_202_ran"] is True  # correctness, not a timing
    assert "peak depth" in done.stdout
