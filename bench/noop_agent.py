"""No-op work for bench/e2e.py and bench/latency.py (imported by RQ work horses, so keep it light).

- ``done``: a clawq python agent (``agent.callable: bench.noop_agent:done``) that does nothing and is done;
- ``stamp``: the same, first appending ``{"task_id", "t"}`` (its start, time.time()) to $BENCH_STAMPS;
- ``noop``: a plain RQ job that does nothing (the baseline of e2e).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

STAMPS_ENV = "BENCH_STAMPS"

_DONE = {"status": "done", "needs_follow_up": False, "summary": "noop"}


def done(task: dict[str, Any]) -> dict[str, Any]:
    return dict(_DONE)


def stamp(task: dict[str, Any]) -> dict[str, Any]:
    t = time.time()
    line = json.dumps({"task_id": task["task_id"], "t": t}) + "\n"
    fd = os.open(os.environ[STAMPS_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
    return dict(_DONE)


def noop() -> dict[str, Any]:
    return dict(_DONE)
