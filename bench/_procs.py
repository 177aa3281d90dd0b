"""Subprocesses of the end-to-end benchmarks: ``clawq dispatch``, ``clawq worker`` and plain ``rq worker``.

Each runs from the repo root (``python -m cli ...``), its output in a log file of the run's temporary directory;
only the processes started here are ever stopped (SIGTERM, then SIGKILL), by their Popen handle.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis
from rq import Queue, Worker

from ._common import ROOT

__all__ = ["Procs"]

_READY_TIMEOUT_S = 30.0


class Procs:
    """The processes of one benchmark run, logging under ``logdir``."""

    def __init__(self, url: str, logdir: Path, env: dict[str, str] | None = None) -> None:
        self.url = url
        self.logdir = logdir
        self.env = {**os.environ, **(env or {})}
        self._procs: list[subprocess.Popen[bytes]] = []
        self._seq = 0

    def _spawn(self, argv: list[str], name: str) -> tuple[subprocess.Popen[bytes], Path]:
        self._seq += 1
        log = self.logdir / f"{self._seq:03d}-{name}.log"
        with log.open("ab") as fh:
            proc = subprocess.Popen(argv, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=fh,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self._procs.append(proc)
        return proc, log

    def clawq_workers(self, namespace: str, k: int, *, simple: bool, queue: str) -> list[subprocess.Popen[bytes]]:
        extra = ["--simple"] if simple else []
        procs = [self._spawn([sys.executable, "-m", "clawq.cli", "worker", "--redis-url", self.url, "--namespace",
                              namespace, "--queue", queue, "--log-level", "WARNING", *extra], "clawq-worker")[0]
                 for _ in range(k)]
        self._wait_workers(queue, k)
        return procs

    def rq_workers(self, queue: str, k: int, *, simple: bool) -> list[subprocess.Popen[bytes]]:
        extra = ["--worker-class", "rq.worker.SimpleWorker"] if simple else []
        procs = [self._spawn([sys.executable, "-m", "rq.cli", "worker", "--url", self.url, *extra, queue],
                             "rq-worker")[0] for _ in range(k)]
        self._wait_workers(queue, k)
        return procs

    def dispatcher(self, namespace: str) -> subprocess.Popen[bytes]:
        proc, log = self._spawn([sys.executable, "-m", "clawq.cli", "dispatch", "--redis-url", self.url, "--namespace",
                                 namespace, "--log-level", "INFO"], "dispatch")
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while b"dispatching namespace" not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the dispatcher did not start: {log.read_text()[-2000:]}")
            time.sleep(0.02)
        time.sleep(0.3)  # from its first log line to its first XREAD
        return proc

    def _wait_workers(self, queue: str, k: int) -> None:
        conn = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + _READY_TIMEOUT_S
        try:
            while Worker.count(connection=conn, queue=Queue(queue, connection=conn)) < k:
                if time.monotonic() > deadline or any(p.poll() is not None for p in self._procs):
                    raise RuntimeError(f"RQ workers on {queue} did not start; see {self.logdir}")
                time.sleep(0.05)
        finally:
            conn.close()

    def stop(self, procs: list[subprocess.Popen[bytes]] | None = None) -> None:
        """SIGTERM ``procs`` (default: all), SIGKILL those still alive after 10 s."""
        targets = list(self._procs if procs is None else procs)
        for p in targets:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        for p in targets:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
            if p in self._procs:
                self._procs.remove(p)
