"""run_model without Redis: the board's workdir and env for every runner, and the preset's own failures
(an entry that cannot run is agent_config, never an attempt's worth of failure)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from clawq.broker.config import Config
from clawq.workers.agent_output import Done, Failed
from clawq.workers.runners import RunContext, run_model

FAKES = Path(__file__).resolve().parent / "agents"


def task(**over: Any) -> dict[str, Any]:
    return {"task_id": 7, "board": "web", "title": "Fix it", "prompt": "fake:done", "model": "opus",
            "provider": "anthropic", "run_id": "0b5e7a34-6f0c-4e8e-9d59-3c2f1a7b8e01", "run_count": 1, "attempt": 1,
            "context": [], **over}


def cfg(tmp: Path, **over: Any) -> Config:
    doc: dict[str, Any] = {"night_mode": None, "boards": {"web": {"workdir": str(tmp), "env": {"BOARD_X": "1"}}}}
    doc.update(over)
    return Config.model_validate(doc)


def test_the_command_runner_runs_in_the_boards_workdir(tmp_path: Path) -> None:
    probe = ("import json, os, sys; sys.stdin.read(); print(json.dumps({'status': 'done', 'summary': "
             "os.getcwd() + '|' + os.environ.get('BOARD_X', '')}))")
    c = cfg(tmp_path, agent={"runner": "command", "command": [sys.executable, "-c", probe]})
    result = run_model(c, RunContext(task=task(), timeout_s=30))
    assert isinstance(result, Done) and result.outcome.summary == f"{tmp_path}|1"


def _claude_on_path(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bindir = tmp / "bin"
    bindir.mkdir()
    (bindir / "claude").write_text(f'#!/bin/sh\nexec {sys.executable} {FAKES / "fake_claude.py"} "$@"\n')
    (bindir / "claude").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    monkeypatch.setenv("FAKE_AGENT_DIR", str(tmp / "fake"))
    return tmp / "fake" / "calls.jsonl"


def test_a_prompt_template_and_env_from_reach_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _claude_on_path(tmp_path, monkeypatch)
    template = tmp_path / "prompt.txt"
    template.write_text("Board $board, task $task_id: $title\n$prompt\n$outcome_instructions\n")
    monkeypatch.setenv("MY_KEY", "s3cret")
    c = cfg(tmp_path, agents={"opus": {"preset": "claude-code", "prompt_template": str(template),
                                       "env_from": {"ANTHROPIC_API_KEY": "MY_KEY"}}})
    ctx = RunContext(task=task(), timeout_s=30)
    result = run_model(c, ctx)
    assert isinstance(result, Done)
    call = json.loads(calls.read_text().splitlines()[-1])
    assert call["prompt"].startswith("Board web, task 7: Fix it\nfake:done\n") and call["cwd"] == str(tmp_path)
    assert call["env"]["ANTHROPIC_API_KEY"] == "s3cret" and ctx.meta["session_id"]
    assert "s3cret" not in json.dumps(ctx.log) and ctx.meta["usage"]["cost_usd"] == 0.0079825


@pytest.mark.parametrize("broken", ["env_from", "template", "bin"])
def test_an_entry_that_cannot_run_is_agent_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  broken: str) -> None:
    _claude_on_path(tmp_path, monkeypatch)
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    entry: dict[str, Any] = {"preset": "claude-code"}
    entry |= {"env_from": {"ANTHROPIC_API_KEY": "NOT_SET_ANYWHERE"}} if broken == "env_from" else {}
    entry |= {"prompt_template": str(tmp_path / "missing.txt")} if broken == "template" else {}
    entry |= {"bin": "no-such-claude"} if broken == "bin" else {}
    result = run_model(cfg(tmp_path, agents={"opus": entry}), RunContext(task=task(), timeout_s=30))
    assert isinstance(result, Failed) and result.cause == "agent_config", result
    assert not (tmp_path / "fake" / "calls.jsonl").exists()


def test_a_session_the_cli_lost_starts_afresh_with_the_whole_context(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _claude_on_path(tmp_path, monkeypatch)
    doc = task(run_count=2, context=[{"run_id": "r1", "run_count": 1, "model": "opus", "summary": "half done",
                                      "next_prompt": "fake:done finish it"}],
               last_session={"run_id": "r1", "model": "opus", "session_id": "gone-0000"})
    ctx = RunContext(task=doc, timeout_s=30)
    result = run_model(cfg(tmp_path, agents={"opus": {"preset": "claude-code"}}), ctx)
    assert isinstance(result, Done), result
    first, second = (json.loads(ln) for ln in calls.read_text().splitlines())
    assert first["session"] == "gone-0000" and first["prompt"].startswith("fake:done finish it")
    assert second["session"] is None and second["prompt"].startswith("Fix it") and "half done" in second["prompt"]
    assert ctx.meta["session_id"] not in (None, "gone-0000") and ctx.meta["usage"]["output_tokens"] == 6


def test_a_command_agent_may_report_its_session_and_usage(tmp_path: Path) -> None:
    probe = ("import json, sys; t = json.loads(sys.stdin.read()); print(json.dumps({'status': 'done', 'summary': "
             "str(t['last_session']), 'session_id': 'cmd-1', 'usage': {'input_tokens': 5, 'output_tokens': 2, "
             "'cost_usd': 0.25}}))")
    c = cfg(tmp_path, agent={"runner": "command", "command": [sys.executable, "-c", probe]})
    ctx = RunContext(task=task(last_session=None), timeout_s=30)
    result = run_model(c, ctx)
    assert isinstance(result, Done) and result.outcome.summary == "None"
    assert ctx.meta == {"session_id": "cmd-1", "usage": {"input_tokens": 5, "output_tokens": 2, "cost_usd": 0.25}}
