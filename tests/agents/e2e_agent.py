"""The agent of the end-to-end tests: logs its start and end, then prints an outcome.

Usage: ``e2e_agent.py LOGFILE``. The task's prompt is a JSON document saying how to behave:

- ``dur`` (s): how long the run takes;
- ``follow`` (n): runs 1..n ask for a follow-up;
- ``rl`` (model): the first run of this task on that model answers
  ``429 Too Many Requests. Please try again in 10s`` on stderr and exits 1;
- ``hang`` (s): the first run of this task sleeps that long (a worker gets killed under it).

While the file ``LOGFILE.down`` names the run's provider, that provider is down: every run on it answers
Anthropic's 529 ``overloaded_error`` on stderr and exits 1 (the breaker's end-to-end test).

Each log line is one JSON object appended in one write (task_id, board, model, provider, run_id,
run_count, t, pid, ppid, gppid; ``leaked`` lists clawq/Redis settings found in the environment).
"""

from __future__ import annotations

import json
import os
import sys
import time

_FORBIDDEN = ("CLAWQ_REDIS_URL", "REDIS_URL", "CLAWQ_NAMESPACE", "CLAWQ_RQ_REDIS_URL")


def _log(path: str, doc: dict[str, object]) -> None:
    line = (json.dumps(doc) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _first_time(log: str, task_id: int, what: str) -> bool:
    marker = f"{log}.{what}.{task_id}"
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def _provider_down(log: str, provider: str) -> bool:
    try:
        with open(f"{log}.down", encoding="utf-8") as fh:
            return fh.read().strip() == provider
    except OSError:
        return False


def _parent_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def main() -> int:
    log = sys.argv[1]
    task = json.loads(sys.stdin.read())
    plan = json.loads(task["prompt"] or "{}")
    base = {k: task[k] for k in ("task_id", "board", "model", "provider", "run_id", "run_count")}
    env_ok = (os.environ.get("CLAWQ_TASK_ID") == str(task["task_id"])
              and os.environ.get("CLAWQ_RUN_ID") == task["run_id"])
    leaked = [k for k in _FORBIDDEN if k in os.environ]
    _log(log, {"ev": "start", **base, "t": time.time(), "pid": os.getpid(), "ppid": os.getppid(),
               "gppid": _parent_of(os.getppid()),
               "leaked": leaked, "env_ok": env_ok})
    if _provider_down(log, str(task["provider"])):
        time.sleep(float(plan.get("dur", 0.2)) / 2)
        _log(log, {"ev": "end", **base, "t": time.time(), "result": "overloaded"})
        print('{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}', file=sys.stderr)
        return 1
    if plan.get("hang") and _first_time(log, task["task_id"], "hang"):
        time.sleep(float(plan["hang"]))
    time.sleep(float(plan.get("dur", 0.2)))
    if plan.get("rl") == task["model"] and _first_time(log, task["task_id"], "rl"):
        _log(log, {"ev": "end", **base, "t": time.time(), "result": "rate_limited"})
        print("calling the model…")
        print("Error: 429 Too Many Requests. Please try again in 10s", file=sys.stderr)
        return 1
    follow = task["run_count"] <= int(plan.get("follow", 0))
    _log(log, {"ev": "end", **base, "t": time.time(), "result": "follow_up" if follow else "done"})
    outcome = {"status": "done", "needs_follow_up": follow, "summary": f"run {task['run_count']} on {task['model']}"}
    if follow:
        outcome["next_prompt"] = "continue"
    print(json.dumps(outcome))
    return 0


if __name__ == "__main__":
    sys.exit(main())
