"""Small helpers shared by the script-level tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from typing import Any

import pytest

from clawq import cli
from clawq.broker import Broker, Config
from clawq.broker.config import DEFAULT_CONFIG, NightModeConfig


def rc(broker: Broker) -> Any:
    """The broker's client, untyped: redis-py's reply types are unions of bytes and str."""
    return broker.client


def task_hash_ids(client: Any, keys: Any) -> list[int]:
    """The id of every task hash of the namespace (a SCAN: only tests and operators scan; clawq keeps no index
    of every task)."""
    found = (str(k)[len(keys.prefix) + len("task:"):] for k in client.scan_iter(match=keys.prefix + "task:*"))
    return sorted(int(rest) for rest in found if rest.isdigit())


def daytime_config(now: float, base: Config = DEFAULT_CONFIG) -> Config:
    """``base`` with its night window (UTC) opening 6 hours after ``now`` and closing an hour later: a test that
    asserts day figures (the day cap, a run's ``night``) must not depend on the hour it runs (the default
    window, 23:00-08:00 in Buenos Aires, is 02:00-11:00 UTC)."""
    night = base.night_mode or NightModeConfig()
    opens = time.gmtime(now + 6 * 3600)
    closes = time.gmtime(now + 7 * 3600)
    window = night.model_copy(update={"timezone": "UTC", "start": time.strftime("%H:%M", opens),
                                      "end": time.strftime("%H:%M", closes)})
    return base.model_copy(update={"night_mode": window})


def ms(seconds: float) -> int:
    return int(seconds * 1000)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of ``clawq argv``, run in-process."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    out, err = capsys.readouterr()
    assert isinstance(exc.value.code, int)
    return exc.value.code, out, err


def counts(client: Any, key: str) -> dict[str, str]:
    """A counter hash's non-zero fields (the scripts leave the inflight counters at 0: 0 = absent)."""
    return {f: n for f, n in client.hgetall(key).items() if n != "0"}


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop a process started in its own session, and its whole group: SIGTERM, then SIGKILL after 15 s."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
