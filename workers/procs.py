"""Agent processes: know every process an agent made, and end them all (Linux /proc).

An agent may leave its process group (``setsid``) or daemonize (fork, setsid, fork). Killing its group then
misses those, and a survivor that keeps the agent's stdout or stderr open would keep its pipes open for ever.
So, while a run lives:

- the worker is a child subreaper (``PR_SET_CHILD_SUBREAPER``): an orphan of the agent's tree is re-parented
  to the worker instead of init, so it stays below the worker;
- :class:`AgentTree` notes every descendant of the agent, and every orphan the worker adopts that carries the
  run's environment marker, each with its start time, so a pid that was reused by the system is never killed;
- :meth:`AgentTree.stop` ends them all: an optional polite signal to the agent's group with a grace period
  (for agents that save their state on SIGINT), then SIGKILL to every member until none is left, and the
  worker reaps the orphans it adopted.

``proc_info``/``alive``/``process_table``/``children``/``descendants`` are the one /proc walker; the simulation's
fleet and the tests use it too.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["AgentTree", "ProcInfo", "alive", "children", "descendants", "die_with_parent", "proc_info",
           "process_table", "set_child_subreaper"]

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
#: SIGKILL rounds before giving up on a member (each round kills what the previous one let fork).
_KILL_ROUNDS = 50


@dataclass(frozen=True)
class ProcInfo:
    """One line of /proc/<pid>/stat: parent, state, and start time (clock ticks since boot)."""

    ppid: int
    state: str
    start: int

    @property
    def dead(self) -> bool:
        return self.state in ("Z", "X")


def proc_info(pid: int) -> ProcInfo | None:
    """What /proc says of ``pid`` now; None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces and parens
    try:
        return ProcInfo(ppid=int(fields[1]), state=fields[0], start=int(fields[19]))
    except (IndexError, ValueError):
        return None


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its reaper does not count)."""
    info = proc_info(pid)
    return info is not None and not info.dead


def process_table() -> dict[int, ProcInfo]:
    """Every process this user can see, read once from /proc."""
    table: dict[int, ProcInfo] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if entry.name.isdigit() and (info := proc_info(int(entry.name))) is not None:
                table[int(entry.name)] = info
    return table


def _kernel_children(pid: int) -> list[int] | None:
    """``pid``'s children as the kernel lists them per thread (/proc/<pid>/task/<tid>/children): no walk of all
    of /proc. None where the kernel does not keep that list (CONFIG_PROC_CHILDREN unset)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    kids: list[int] = []
    for tid in tids:
        try:
            kids.extend(int(k) for k in Path(f"/proc/{pid}/task/{tid}/children").read_text().split())
        except FileNotFoundError:
            if not Path(f"/proc/{pid}/task/{tid}").exists():
                continue  # that thread ended meanwhile
            return None
        except (OSError, ValueError):
            continue
    return kids


def children(pid: int, table: dict[int, ProcInfo] | None = None) -> list[int]:
    """Direct children of ``pid`` (e.g. the RQ work-horse of a busy worker): from the kernel's list when there is
    one and no ``table`` is given, else from ``table`` (default: one read of all of /proc)."""
    if table is None and (kids := _kernel_children(pid)) is not None:
        return kids
    table = process_table() if table is None else table
    return [kid for kid, info in table.items() if info.ppid == pid]


def descendants(pid: int, table: dict[int, ProcInfo] | None = None) -> list[int]:
    """Every process below ``pid`` (children, theirs, …): from the kernel's lists (cost: the size of the tree),
    or from ``table`` / one read of all of /proc where there are none."""
    if table is None and _kernel_children(pid) is None:
        table = process_table()
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = children(todo.pop(), table)
        found.extend(kids)
        todo.extend(kids)
    return found


def _prctl(option: int, value: int) -> bool:
    """prctl(2) on Linux; False where it is not available or refused."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return bool(libc.prctl(option, value, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def set_child_subreaper() -> bool:
    """Make this process the reaper of its descendants' orphans (Linux); False where that is not possible."""
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def die_with_parent() -> None:
    """For ``preexec_fn``: the child gets SIGKILL when the thread that started it dies (Linux), so a parent
    killed with SIGKILL leaves no orphan behind."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _has_marker(pid: int, marker: bytes) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return marker in environ.split(b"\0")


@dataclass
class AgentTree:
    """The processes of one agent run: its leader, every descendant seen, and the orphans this process adopts.

    Make it before starting the agent (it notes this process's children so far, which are not the agent's),
    then :meth:`lead` with the agent's pid; :meth:`scan` while the run lives; :meth:`stop` at its end.
    ``marker`` (``NAME=value``) is an environment entry that only the agent's processes carry.
    """

    marker: str
    leader: int | None = None
    members: dict[int, int] = field(default_factory=dict)  #: pid -> start time
    _before: frozenset[int] = frozenset()
    _me: int = field(default_factory=os.getpid)

    def __post_init__(self) -> None:
        set_child_subreaper()
        self._before = frozenset(children(self._me))

    def lead(self, pid: int) -> None:
        self.leader = pid
        info = proc_info(pid)
        if info is not None:
            self.members[pid] = info.start

    def scan(self) -> None:
        """Note every live member now: the leader's descendants, the members' descendants, and the orphans this
        process adopted (its children since the start that carry the marker). Its cost is the size of the
        agent's tree, not the number of processes on the machine (where the kernel lists children)."""
        roots = [self.leader] if self.leader is not None else []
        roots += [pid for pid in self.members if self._same(pid)]
        # The tree first, this process's adopted orphans after: a process whose parent dies between the two reads
        # moves from the tree to this process's children, and the second read finds it. The other order missed
        # it (the agent killed mid-scan, its escaped child re-parented between the reads: left running).
        below = [d for root in roots for d in descendants(root)]
        adopted = [kid for kid in children(self._me) if kid not in self._before and kid != self.leader
                   and kid not in self.members and _has_marker(kid, self.marker.encode())]
        for pid in {*roots, *below, *adopted}:
            info = proc_info(pid)
            if info is not None and not info.dead:
                self.members.setdefault(pid, info.start)

    def _same(self, pid: int) -> bool:
        """``pid`` still runs and is the process noted (not a reuse of its number)."""
        info = proc_info(pid)
        return info is not None and not info.dead and info.start == self.members.get(pid)

    def alive(self) -> list[int]:
        """Members still running (a zombie is dead), after a fresh scan."""
        self.scan()
        return [pid for pid in self.members if self._same(pid)]

    def stop(self, first: signal.Signals | None = None, grace_s: float = 0.0) -> None:
        """End the run's processes: ``first`` to the leader's group (and the leader), up to ``grace_s`` for the
        leader to exit, then SIGKILL to every member until none is left; reap the adopted orphans."""
        if first is not None and self.leader is not None:
            self._signal_leader(first)
            end = time.monotonic() + grace_s
            while time.monotonic() < end and self.leader in self.alive():
                time.sleep(0.05)
        if self.leader is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.leader, signal.SIGKILL)
        for _ in range(_KILL_ROUNDS):
            left = self.alive()
            if not left:
                break
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            self.reap()
        self.reap()

    def _signal_leader(self, sig: signal.Signals) -> None:
        assert self.leader is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.leader, sig)
        # A leader that moved to another group is not reached by its old group's signal; one still in it must
        # not get the signal twice (a CLI that counts its interrupts would take a second one as "force quit").
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(self.leader) != self.leader:
                os.kill(self.leader, sig)

    def reap(self) -> None:
        """Collect the exit status of the orphans this process adopted (the leader is its Popen's to wait for)."""
        for pid in list(self.members):
            if pid == self.leader:
                continue
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
