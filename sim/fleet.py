"""The process fleet: real ``clawq dispatch`` / ``clawq worker`` processes (or any other command) for the
simulation, the chaos run, the end-to-end tests and the benchmarks.

One rule for a child's environment (:func:`child_env`): the parent's own, minus every variable that names a
clawq setting or a Redis credential (the prefixes agents never see either), plus what the caller passes on
purpose. The Redis URL and the namespace go through the environment (``CLAWQ_REDIS_URL``,
``CLAWQ_NAMESPACE``), never through argv, so a password never shows in ``ps``.

Every process starts in its own session, logs to ``<logdir>/<name>.log``, and is stopped only through the
handle this fleet holds: SIGTERM, then SIGKILL after a grace period. Processes below it (an RQ work-horse, the
agent the horse started in a session of its own) are noted before the stop and killed if they outlive it; a
noted pid is killed only while it still belongs to the same process (its start time has not changed).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clawq.workers.procs import alive, children, descendants, die_with_parent, proc_info
from clawq.workers.runners import SECRET_ENV_PREFIXES

__all__ = ["Fleet", "alive", "child_env", "children", "descendants", "kill_family"]

#: How long a stopped process may take to exit after SIGTERM before it is killed.
STOP_GRACE_S = 10.0


def child_env(url: str | None = None, namespace: str | None = None,
              extra: Mapping[str, str] | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a fleet process: ``base`` (default: ours) without clawq's settings and Redis
    credentials, then ``extra``, then the Redis URL and namespace this fleet runs against."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith(SECRET_ENV_PREFIXES)}
    env.update(extra or {})
    if url is not None:
        env["CLAWQ_REDIS_URL"] = url
    if namespace is not None:
        env["CLAWQ_NAMESPACE"] = namespace
    return env


# -- /proc (the walker is workers.procs) ----------------------------------------------------------------
def _identity(pid: int) -> tuple[int, str] | None:
    info = proc_info(pid)
    return (pid, str(info.start)) if info is not None else None


def kill_family(pids: Iterable[tuple[int, str]]) -> None:
    """SIGKILL each (pid, start time) noted earlier, if that pid still is that process."""
    for pid, started in pids:
        if _identity(pid) == (pid, started) and alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def family_of(pid: int) -> list[tuple[int, str]]:
    """The (pid, start time) of every process below ``pid``, to kill later without hitting a reused pid."""
    return [ident for kid in descendants(pid) if (ident := _identity(kid)) is not None]


# -- the fleet ------------------------------------------------------------------------------------------
@dataclass
class Fleet:
    """The processes of one run against one Redis URL and namespace, logging under ``logdir``."""

    url: str
    namespace: str
    logdir: Path
    extra_env: dict[str, str] = field(default_factory=dict)  #: added to every child's environment
    log_level: str = "WARNING"
    cwd: Path | None = None
    #: each process gets SIGKILL when the thread that started it ends (Linux PDEATHSIG): a parent killed with
    #: SIGKILL leaves no fleet behind. Only for a fleet started and stopped by one long-lived thread.
    tied: bool = False
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    kills: list[dict[str, Any]] = field(default_factory=list)
    _seq: Counter[str] = field(default_factory=Counter)

    @property
    def env(self) -> dict[str, str]:
        return child_env(self.url, self.namespace, self.extra_env)

    def log_path(self, name: str) -> Path:
        return self.logdir / f"{name}.log"

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        """Start ``argv`` as ``name`` in its own session, its output in ``<logdir>/<name>.log``."""
        if name in self.procs:
            raise ValueError(f"a process named {name!r} already exists in this fleet")
        with self.log_path(name).open("ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.env, cwd=self.cwd, start_new_session=True,
                                    preexec_fn=die_with_parent if self.tied else None)
        self.procs[name] = proc
        return proc

    def next_name(self, kind: str) -> str:
        """``kind`` numbered from 1 (worker1, worker2, …), skipping names already taken."""
        while True:
            self._seq[kind] += 1
            name = f"{kind}{self._seq[kind]}"
            if name not in self.procs:
                return name

    def clawq(self, name: str, *args: str, log_level: str | None = None) -> subprocess.Popen[bytes]:
        """Start ``clawq ARGS --log-level L`` (a ``dispatch`` or ``worker`` command) as ``name``."""
        level = log_level or self.log_level
        return self.spawn(name, [sys.executable, "-m", "clawq.cli", *args, "--log-level", level])

    def dispatcher(self, name: str | None = None, *extra: str) -> str:
        name = name or self.next_name("dispatcher")
        self.clawq(name, "dispatch", *extra)
        return name

    def worker(self, name: str | None = None, *extra: str) -> str:
        """Start a ``clawq worker`` named ``<namespace>-<name>`` in RQ; returns the fleet's name for it."""
        name = name or self.next_name("worker")
        self.clawq(name, "worker", "--name", f"{self.namespace}-{name}", *extra)
        return name

    def run_cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run one ``clawq`` command to the end in the fleet's environment (stdout and stderr captured)."""
        return subprocess.run([sys.executable, "-m", "clawq.cli", *args], env=self.env, cwd=self.cwd,
                              capture_output=True, text=True, timeout=timeout, check=False)

    def alive(self, prefix: str = "") -> list[str]:
        """Names of the processes still running whose name starts with ``prefix``."""
        return [n for n, p in self.procs.items() if n.startswith(prefix) and p.poll() is None]

    def busy_workers(self) -> list[str]:
        """Running workers with a child (an RQ work-horse running a job)."""
        return [n for n in self.alive("worker") if children(self.procs[n].pid)]

    def kill(self, name: str) -> dict[str, Any]:
        """SIGKILL ``name`` and everything below it (work-horse, agent), as a crash would; noted in ``kills``."""
        proc = self.procs[name]
        family = family_of(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        kill_family(family)
        proc.wait()
        kill = {"at": time.time(), "killed": name, "pids": [proc.pid, *(pid for pid, _ in family)]}
        self.kills.append(kill)
        return kill

    def kill_busy_worker(self, pick: Callable[[list[str]], str] | None = None) -> dict[str, Any] | None:
        """SIGKILL one busy worker (``pick`` chooses among their names) and its family; start a replacement."""
        busy = self.busy_workers()
        if not busy:
            return None
        kill = self.kill(busy[0] if pick is None else pick(busy))
        kill["replacement"] = self.worker()
        return kill

    def log_tail(self, name: str, chars: int = 6000) -> str:
        path = self.log_path(name)
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop(self, names: Iterable[str] | None = None, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM ``names`` (default: every process), SIGKILL the group of any still running after
        ``grace_s``, then kill what they left below them."""
        targets = [self.procs[n] for n in (list(self.procs) if names is None else names)]
        running = [p for p in targets if p.poll() is None]
        family = [ident for p in running for ident in family_of(p.pid)]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in running:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        kill_family(family)
