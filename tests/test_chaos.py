"""A small chaos run in CI: real dispatchers and workers on a private AOF redis7, with kills, a restart, an outage.

The script (tests/chaos/chaos.py) starts its own ``redis-server`` (the system binary) on a free port, never 6379;
it checks every invariant itself and exits non-zero on a violation. Here we run it and read its report.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from redis_servers import redis_binaries

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(240)
def test_a_small_chaos_night_loses_nothing_and_runs_nothing_twice(tmp_path: Path) -> None:
    binary = redis_binaries().get("redis7")
    if binary is None:
        pytest.skip("the chaos run uses the system redis-server (redis7)")
    report_path, out_path = tmp_path / "chaos.json", tmp_path / "chaos.out"
    cmd = [sys.executable, "-m", "tests.chaos.chaos", "--tasks", "60", "--boards", "8", "--dispatchers", "2",
           "--workers", "3", "--worker-kills", "1", "--dispatcher-kills", "1", "--redis-restarts", "1",
           "--outages", "1", "--outage-s", "3", "--redis-wipes", "1",
           "--seconds", "150", "--binary", binary, "--json", str(report_path)]
    with out_path.open("wb") as out:  # a file, not a pipe: no deadlock whatever the script prints
        proc = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              timeout=220, check=False)
    output = out_path.read_text(errors="replace")
    assert report_path.exists(), output
    report = json.loads(report_path.read_text())
    figures = report["figures"]
    assert proc.returncode == 0, output
    assert report["ok"], json.dumps(report["violations"], indent=1)
    assert figures["finished"] and figures["lost"] == 0 and figures["duplicates"] == 0
    assert figures["counter_mismatches"] == 0
    assert figures["doctor_problems"] == 0, report["violations"]["doctor"]
    assert figures["worker_kills"] >= 1 and figures["dispatcher_kills"] >= 1 and figures["kills"] > 0
    assert figures["redis_restarts"] == 1 and figures["outages"] == 1
    assert figures["unexpected_exits"] == 0, report.get("crashes")  # workers survive a Redis restart
    # the wipe lost the tasks it found; the batch added after it (into the namespace a dispatcher restored)
    # ended like any other: nothing that still exists is left unfinished
    assert figures["redis_wipes"] == 1 and figures["wiped_tasks"] > 0 and figures["added_after_wipe"] >= 8
    assert sum(figures["statuses"].values()) == 60 - figures["wiped_tasks"] + figures["added_after_wipe"]
    assert figures["statuses"].get("in_review", 0) + figures["statuses"].get("failed", 0) == sum(
        figures["statuses"].values())
    assert all(not v for v in report["violations"].values())
