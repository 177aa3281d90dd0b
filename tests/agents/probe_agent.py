"""A command agent for the runner tests: records what it was given, then behaves as MODE says.

Usage: ``probe_agent.py RECORD MODE [args...]``. RECORD gets one JSON document (argv, the raw stdin, the
environment, pid, process group and session) written atomically before MODE runs:

- ``done``: print a log line and a done outcome;
- ``sleep``: start a child that sleeps (its pid goes to RECORD.child), then sleep 60 s;
- ``nostdin``: never read stdin, sleep ``args[0]`` seconds, then print a done outcome;
- ``stderr``: print ``args[0]`` on stderr and exit with code ``args[1]``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def _write(path: str, doc: object) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(doc, fh)
    os.replace(tmp, path)


def main() -> int:
    record, mode, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    stdin = "" if mode == "nostdin" else sys.stdin.read()
    _write(record, {"argv": sys.argv[1:], "stdin": stdin, "env": dict(os.environ), "pid": os.getpid(),
                    "pgid": os.getpgid(0), "sid": os.getsid(0)})
    if mode == "sleep":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        _write(record + ".child", {"pid": child.pid})
        time.sleep(60)
        return 0
    if mode == "nostdin":
        time.sleep(float(args[0]))
    if mode == "stderr":
        print(args[0], file=sys.stderr)
        return int(args[1])
    print("agent log: working")
    print(json.dumps({"status": "done", "needs_follow_up": False, "summary": "probe done"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
