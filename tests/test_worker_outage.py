"""`clawq worker` says once that Redis is gone and once that it is back: never a guess, never a traceback."""

from __future__ import annotations

import logging
import sys

import redis

from clawq.workers.rq_glue import _Outage, _OutageFilter


def _record(message: str, exc: BaseException | None = None) -> logging.LogRecord:
    info = (type(exc), exc, None) if exc is not None else None
    return logging.LogRecord("rq.worker", logging.ERROR, __file__, 1, message, None, info)


def test_reconnection_errors_and_tracebacks_become_one_line_per_outage(caplog: object) -> None:
    outage = _Outage()
    f = _OutageFilter(outage)
    down = "Worker w: could not connect to Redis instance: Error 111. retrying in 2 seconds..."
    with caplog.at_level(logging.INFO, logger="clawq.worker"):  # type: ignore[attr-defined]
        assert [f.filter(_record(down)) for _ in range(5)] == [False] * 5
        try:
            try:
                raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")
            except redis.ConnectionError as inner:
                raise RuntimeError("monitoring the work-horse") from inner
        except RuntimeError:
            quitting = _record("Worker w: found an unhandled exception, quitting...", sys.exc_info()[1])
        assert f.filter(quitting) is False  # RQ's 60-line traceback of a lost Redis: dropped
        assert f.filter(_record("Worker w: started")) is True  # any other line: kept, and NOT "reachable again"
        assert outage.down
        outage.back()  # what a successful RQ heartbeat (a write) says
        outage.back()
        assert f.filter(_record(down)) is False
    lines = [r.getMessage() for r in caplog.records if r.name == "clawq.worker"]  # type: ignore[attr-defined]
    assert [ln.split(" (")[0].split(":")[0] for ln in lines] == [
        "Redis is unreachable", "Redis is reachable again", "Redis is unreachable"]


def test_other_errors_keep_their_traceback() -> None:
    f = _OutageFilter(_Outage())
    try:
        raise ValueError("a bug")
    except ValueError:
        record = _record("Worker w: found an unhandled exception, quitting...", sys.exc_info()[1])
    assert f.filter(record) is True
