"""A command agent for the runner tests: records what it was given, then behaves as MODE says.

Usage: ``probe_agent.py RECORD MODE [args...]``. RECORD gets one JSON document (argv, the raw stdin, the
environment, pid, process group and session) written atomically before MODE runs:

- ``done``: print a log line and a done outcome;
- ``sleep``: start a child that sleeps (its pid goes to RECORD.child), then sleep 60 s;
- ``nostdin``: never read stdin, sleep ``args[0]`` seconds, then print a done outcome;
- ``stderr``: print ``args[0]`` on stderr and exit with code ``args[1]``;
- ``bytes``: copy the file ``args[0]`` to stdout and the file ``args[1]`` to stderr (any bytes: NUL, escape
  sequences, invalid UTF-8, megabytes), then exit with code ``args[2]``;
- ``escape``: start a child in a new session (``setsid``) that keeps stdout and stderr open and sleeps (its pid
  goes to RECORD.child), then sleep 60 s;
- ``daemon``: daemonize a grandchild the classic way (fork, setsid, fork; the middle process exits at once) that
  keeps stdout and stderr open and sleeps (its pid goes to RECORD.child), then print a done outcome and exit 0.
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


def _daemonize(pidfile: str) -> None:
    """Fork, setsid, fork: the grandchild is nobody's child in our tree and holds our stdout and stderr."""
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            _write(pidfile, {"pid": os.getpid()})
            time.sleep(60)
        os._exit(0)
    while not os.path.exists(pidfile):
        time.sleep(0.01)


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
    if mode == "bytes":
        with open(args[0], "rb") as out, open(args[1], "rb") as err:
            sys.stdout.buffer.write(out.read())
            sys.stderr.buffer.write(err.read())
        return int(args[2])
    if mode == "escape":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
        _write(record + ".child", {"pid": child.pid})
        time.sleep(60)
        return 0
    if mode == "daemon":
        _daemonize(record + ".child")
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
