"""Field faults on the worker's side of a run, each with real processes on a private Redis: an agent's child that
escapes its session and holds its pipes, control bytes in what an agent prints, a Redis pause while a run
reports (issue 13, items 3, 4 and 5)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from test_job import claimed, jobs  # noqa: F401  (jobs is a fixture)

from clawq.broker import Broker, TaskStatus
from clawq.broker.config import Config
from clawq.workers.job import run_task
from clawq.workers.procs import alive

PROBE = str(Path(__file__).parent / "agents" / "probe_agent.py")


def command_config(*argv: str, timeout_minutes: float = 1.0) -> Config:
    return Config.model_validate({
        "night_mode": None, "notify": {"log": False},
        "agent": {"runner": "command", "command": [sys.executable, PROBE, *argv], "timeout_minutes": timeout_minutes}})


# -- item 3: no process survives its run ----------------------------------------------------------------------
def test_an_agent_whose_setsid_child_holds_its_pipes_is_reported_as_a_timeout_in_time(
        broker: Broker, jobs: Any, tmp_path: Path) -> None:  # noqa: F811
    """The child leaves the agent's session and keeps stdout/stderr open: the job neither hangs nor heartbeats
    on; it reports ``timeout`` within the timeout plus a few seconds, and the child is gone."""
    record = tmp_path / "record.json"
    broker.load_config(command_config(str(record), "escape", timeout_minutes=0.025))  # 1.5 s
    tid, run_id = claimed(broker)
    t0 = time.monotonic()
    try:
        out = run_task(broker.namespace, tid, run_id)
    finally:
        child = int(json.loads(Path(f"{record}.child").read_text())["pid"])
        escaped = alive(child)
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, 9)
    assert out["reported"] and out["result"] == "timeout", out
    assert time.monotonic() - t0 < 1.5 + 3
    assert not escaped, "the agent's setsid child survived the run"
    task = broker.get_task(tid)
    assert task.last_error_reason == "timeout" and task.status is TaskStatus.UP_NEXT


# -- item 4: whatever an agent prints is sanitised before it reaches the broker -------------------------------
def run_bytes(broker: Broker, tmp_path: Path, stdout: bytes, stderr: bytes, code: int) -> dict[str, Any]:
    (tmp_path / "out").write_bytes(stdout)
    (tmp_path / "err").write_bytes(stderr)
    broker.load_config(command_config(str(tmp_path / "record.json"), "bytes", str(tmp_path / "out"),
                                      str(tmp_path / "err"), str(code)))
    tid, run_id = claimed(broker)
    out = run_task(broker.namespace, tid, run_id)
    assert out["reported"], out
    return out


def test_a_nul_byte_on_stderr_is_reported_at_once_as_the_failure_it_is(broker: Broker, jobs: Any,  # noqa: F811
                                                                       tmp_path: Path) -> None:
    out = run_bytes(broker, tmp_path, b"", b"fatal: cannot lock ref\x00 'HEAD'\x1b[31m red\x1b[0m\x07\n", 1)
    assert out["result"] == "failed"
    task = broker.get_task(out["task_id"])
    assert task.status is TaskStatus.UP_NEXT and task.last_error_reason == "failed"
    assert task.last_error is not None and "cannot lock ref 'HEAD' red" in task.last_error
    assert not [c for c in task.last_error if ord(c) < 32 and c not in "\t\n"], repr(task.last_error)


def test_a_rate_limit_message_with_a_nul_is_still_a_rate_limit(broker: Broker, jobs: Any,  # noqa: F811
                                                               tmp_path: Path) -> None:
    before = time.time()
    out = run_bytes(broker, tmp_path, b"", b"Error: 429\x00 Too Many Requests. Please try again in 5 minutes.\n", 1)
    assert out["result"] == "rate_limit"
    cooldowns = broker.cooldowns()
    assert before + 280 < cooldowns["codex"]["until"] < time.time() + 320, cooldowns
    task = broker.get_task(out["task_id"])
    assert task.status is TaskStatus.UP_NEXT and task.attempts == 0


def test_control_bytes_and_bad_utf8_in_an_outcome_are_cleaned_not_fatal(broker: Broker, jobs: Any,  # noqa: F811
                                                                        tmp_path: Path) -> None:
    line = json.dumps({"status": "done", "needs_follow_up": False, "summary": "fixed\u0000 the\u001b[1m form\u0007"})
    out = run_bytes(broker, tmp_path, b"log \xff\xfe line\x00\n" + line.encode() + b"\n", b"", 0)
    assert out["result"] == "completed"
    task = broker.get_task(out["task_id"])
    assert task.status is TaskStatus.IN_REVIEW
    assert task.context[-1]["summary"] == "fixed the form"


def test_a_huge_stderr_is_cut_to_the_broker_limit_and_reported(broker: Broker, jobs: Any,  # noqa: F811
                                                               tmp_path: Path) -> None:
    out = run_bytes(broker, tmp_path, b"", b"x" * 200_000 + b"\x00 the end\n", 2)
    assert out["result"] == "failed"
    task = broker.get_task(out["task_id"])
    assert task.last_error is not None and task.last_error.endswith("the end")


@pytest.mark.parametrize("field", ["summary", "error", "message"])
def test_a_python_agent_returning_nul_or_lone_surrogates_is_reported(
        broker: Broker, jobs: Any, field: str, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    from agents import py_agent

    doc = {"summary": {"status": "done", "needs_follow_up": False, "summary": "ok\x00\ud800"},
           "error": {"status": "failed", "error": "bad\x00\udcff news"},
           "message": {"status": "rate_limited", "message": "429\x00 Too Many Requests, retry in 30s"}}[field]
    monkeypatch.setattr(py_agent, "RETURNS", doc)
    broker.load_config(Config.model_validate({"night_mode": None, "notify": {"log": False},
                                              "agent": {"runner": "python", "callable": "agents.py_agent:returns"}}))
    tid, run_id = claimed(broker)
    out = run_task(broker.namespace, tid, run_id)
    assert out["reported"], out
    assert out["result"] == {"summary": "completed", "error": "failed", "message": "rate_limit"}[field]
