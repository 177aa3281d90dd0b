"""`clawq worker` says once that Redis is gone, however many times RQ retries."""

from __future__ import annotations

import logging

from clawq.workers.rq_glue import _OncePerOutage


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord("rq.worker", logging.ERROR, __file__, 1, message, None, None)


def test_reconnection_errors_are_logged_once_per_outage() -> None:
    f = _OncePerOutage()
    down = "Worker w: could not connect to Redis instance: Error 111. retrying in 2 seconds..."
    assert [f.filter(_record(down)) for _ in range(5)] == [True, False, False, False, False]
    assert f.filter(_record("Worker w: started")) is True  # back: the next outage is reported again
    assert f.filter(_record(down)) is True
