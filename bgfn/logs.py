"""Log lines: one per invocation (web) and one per job event (worker), linked by the request id,
which is also the job id of a background invocation. Text by default; JSON lines with
BGFN_LOG_FORMAT=json."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

FIELDS = ("event", "function", "kind", "request_id", "job_id", "status", "duration_ms", "attempt", "error")


class _SecondCache:
    """A record's time in whole seconds, formatted once per second (the web tier logs a line per
    invocation; strftime on each was ~1 µs of a line's ~30)."""

    def __init__(self, convert: Callable[[float | None], time.struct_time], pattern: str) -> None:
        self.convert = convert
        self.pattern = pattern
        self.cached = (-1, "")  # (second, its text), replaced as one, so threads never mix two seconds

    def __call__(self, created: float) -> str:
        second = int(created)
        cached = self.cached
        if cached[0] != second:
            cached = (second, time.strftime(self.pattern, self.convert(second)))
            self.cached = cached
        return cached[1]


class TextFormatter(logging.Formatter):
    """`TIME LEVEL LOGGER: MESSAGE`, the time as logging's default `asctime` (local, with milliseconds)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._seconds = _SecondCache(time.localtime, self.default_time_format)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return f"{self._seconds(record.created)},{int(record.msecs):03d}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and bgfn's fields when present."""

    def __init__(self) -> None:
        super().__init__()
        self._seconds = _SecondCache(time.gmtime, "%Y-%m-%dT%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": f"{self._seconds(record.created)}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                data[key] = value
        if record.exc_info:
            data["trace"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def setup(level: str, fmt: str = "text") -> None:
    """Configure the root logger once for a bgfn process."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Neither format shows where a line was logged from or by which thread, so records do not collect
    # it (the logging HOWTO's "Optimization"): the caller lookup walks the stack on every line, the web
    # tier writes one per invocation. (The process id stays: gunicorn's own lines show it.)
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    for name in ("rq", "rq.worker", "rq.scheduler", "rq.queue", "rq.job"):
        # RQ installs its own handlers when a worker starts; route its lines through ours instead.
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
