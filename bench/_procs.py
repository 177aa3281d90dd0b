"""Subprocesses of the end-to-end benchmarks: ``clawq dispatch``, ``clawq worker`` and plain ``rq worker``.

They run in the shared process fleet (:mod:`sim.fleet`: one environment rule, own sessions, logs in the run's
temporary directory, stopped only through their handles); this module adds the benchmarks' readiness waits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import redis
from rq import Queue, Worker

from clawq.sim.fleet import Fleet

__all__ = ["Procs", "cpu_s"]

_READY_TIMEOUT_S = 30.0
_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) of process ``pid`` itself, and of its children it has reaped (an RQ
    worker's work-horses), from /proc; (0, 0) where /proc is missing (not Linux) or the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime) / _TICKS, (cutime + cstime) / _TICKS


class Procs:
    """The processes of one benchmark run, logging under ``logdir``."""

    def __init__(self, url: str, logdir: Path, env: dict[str, str] | None = None) -> None:
        self.url = url
        self.logdir = logdir
        self._fleets: dict[str, Fleet] = {}
        self._env = dict(env or {})

    def _fleet(self, namespace: str) -> Fleet:
        if namespace not in self._fleets:
            logdir = self.logdir / namespace
            logdir.mkdir(parents=True, exist_ok=True)
            self._fleets[namespace] = Fleet(self.url, namespace, logdir, extra_env=self._env)
        return self._fleets[namespace]

    def clawq_workers(self, namespace: str, k: int, *, simple: bool, queue: str) -> list[subprocess.Popen[bytes]]:
        fleet = self._fleet(namespace)
        extra = ["--queue", queue, *(["--simple"] if simple else [])]
        procs = [fleet.procs[fleet.worker(None, *extra)] for _ in range(k)]
        self._wait_workers(queue, k)
        return procs

    def rq_workers(self, queue: str, k: int, *, simple: bool) -> list[subprocess.Popen[bytes]]:
        fleet = self._fleet("rq")
        extra = ["--worker-class", "rq.worker.SimpleWorker"] if simple else []
        procs = [fleet.spawn(fleet.next_name("rq-worker"),
                             [sys.executable, "-m", "rq.cli", "worker", "--url", self.url, *extra, queue])
                 for _ in range(k)]
        self._wait_workers(queue, k)
        return procs

    def dispatcher(self, namespace: str) -> subprocess.Popen[bytes]:
        fleet = self._fleet(namespace)
        name = fleet.next_name("dispatcher")
        proc = fleet.clawq(name, "dispatch", log_level="INFO")
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while "dispatching namespace" not in fleet.log_tail(name, 1 << 20):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the dispatcher did not start: {fleet.log_tail(name, 2000)}")
            time.sleep(0.02)
        time.sleep(0.3)  # from its first log line to its first XREAD
        return proc

    def _wait_workers(self, queue: str, k: int) -> None:
        conn = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + _READY_TIMEOUT_S
        try:
            while Worker.count(connection=conn, queue=Queue(queue, connection=conn)) < k:
                dead = any(p.poll() is not None for f in self._fleets.values() for p in f.procs.values())
                if time.monotonic() > deadline or dead:
                    raise RuntimeError(f"RQ workers on {queue} did not start; see {self.logdir}")
                time.sleep(0.05)
        finally:
            conn.close()

    def stop(self, procs: list[subprocess.Popen[bytes]] | None = None) -> None:
        """SIGTERM ``procs`` (default: all), SIGKILL those still alive after 10 s; they leave the run."""
        for fleet in self._fleets.values():
            names = [n for n, p in fleet.procs.items() if procs is None or p in procs]
            fleet.stop(names)
            for n in names:
                del fleet.procs[n]
