"""The chaos agent: appends its start and end to a log (one JSON line each), then prints an outcome.

Usage: ``agent.py LOGFILE``. The task's prompt is JSON: ``dur`` (s) how long a run takes, ``follow`` (n) runs
1..n ask for a follow-up. Each line has ev, task_id, run_id, board, model, provider, run_count, t, pid, ppid.
"""

from __future__ import annotations

import json
import os
import sys
import time


def _log(path: str, doc: dict[str, object]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(doc) + "\n").encode("utf-8"))
    finally:
        os.close(fd)


def main() -> int:
    log = sys.argv[1]
    task = json.loads(sys.stdin.read())
    plan = json.loads(task.get("prompt") or "{}")
    base = {k: task[k] for k in ("task_id", "board", "model", "provider", "run_id", "run_count")}
    _log(log, {"ev": "start", **base, "t": time.time(), "pid": os.getpid(), "ppid": os.getppid()})
    time.sleep(float(plan.get("dur", 0.3)))
    follow = int(task["run_count"]) <= int(plan.get("follow", 0))
    result = "follow_up" if follow else "done"
    _log(log, {"ev": "end", **base, "t": time.time(), "pid": os.getpid(), "result": result})
    outcome: dict[str, object] = {"status": "done", "needs_follow_up": follow,
                                  "summary": f"run {task['run_count']} on {task['model']}"}
    if follow:
        outcome["next_prompt"] = "continue"
    print(json.dumps(outcome))
    return 0


if __name__ == "__main__":
    sys.exit(main())
