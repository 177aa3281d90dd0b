"""Agent runners: the command agent (no shell, own process group, clean env), the python and simulated ones."""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agents import py_agent

from clawq.broker.config import AgentConfig, SimulatedAgentConfig
from clawq.sim.agent import simulated_result
from clawq.workers import runners
from clawq.workers.agent_output import Done, Failed, RateLimited
from clawq.workers.runners import RunContext, Stalled, agent_env, run_agent, run_command

AGENTS = Path(__file__).parent / "agents"
PROBE = str(AGENTS / "probe_agent.py")
RUN_ID = "0b6f4c9e-8e0e-4d5c-9a7e-3f0f6f1c2a11"


def task_doc(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "task_id": 12, "board": "web", "title": "fix the login", "prompt": "make the tests pass", "model": "codex",
        "provider": "openai", "run_id": RUN_ID, "run_count": 2, "attempt": 1, "claim_index": 1,
        "context": [{"run_count": 1, "summary": "half", "next_prompt": "finish"}],
    }
    doc.update(over)
    return doc


def ctx(timeout_s: float = 30.0, **over: Any) -> RunContext:
    return RunContext(task=task_doc(**over), timeout_s=timeout_s)


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its reaper counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_for(path: Path, timeout: float = 10.0) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists():
            return dict(json.loads(path.read_text()))
        time.sleep(0.02)
    raise AssertionError(f"{path} never appeared")


def wait_dead(pid: int, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not alive(pid):
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def reaper() -> Iterator[list[int]]:
    """Pids a test started indirectly; any still alive at the end is killed (by its pid)."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if alive(pid):
            os.kill(pid, 9)


# -- the command runner ----------------------------------------------------------------------------
def test_command_agent_gets_argv_literally_without_a_shell(tmp_path: Path) -> None:
    record = tmp_path / "record.json"
    pwned = tmp_path / "pwned"
    tricky = [f"; touch {pwned}", f"$(touch {pwned}2)", f"`touch {pwned}3`", "a b  c", "*", "|", "&&", "'\"",
              "$HOME", "> out.txt", "\\n"]
    result = run_command([sys.executable, PROBE, str(record), "done", *tricky], ctx())
    assert isinstance(result, Done) and result.outcome.summary == "probe done"
    got = json.loads(record.read_text())
    assert got["argv"] == [str(record), "done", *tricky]
    assert list(tmp_path.iterdir()) == [record], "a shell ran something"


def test_command_agent_gets_the_task_json_on_stdin_and_env(tmp_path: Path) -> None:
    record = tmp_path / "record.json"
    c = ctx(board="api", model="sonnet", provider="anthropic", run_count=3)
    assert isinstance(run_command([sys.executable, PROBE, str(record), "done"], c), Done)
    got = json.loads(record.read_text())
    doc = json.loads(got["stdin"])
    for key in ("task_id", "board", "title", "prompt", "model", "provider", "run_id", "run_count", "context"):
        assert doc[key] == c.task[key], key
    assert (doc["board"], doc["model"], doc["provider"], doc["run_count"]) == ("api", "sonnet", "anthropic", 3)
    env = got["env"]
    assert env["CLAWQ_TASK_ID"] == "12" and env["CLAWQ_RUN_ID"] == RUN_ID
    assert env["CLAWQ_MODEL"] == "sonnet" and env["CLAWQ_PROVIDER"] == "anthropic"


def test_command_agent_runs_in_its_own_process_group(tmp_path: Path) -> None:
    record = tmp_path / "record.json"
    run_command([sys.executable, PROBE, str(record), "done"], ctx())
    got = json.loads(record.read_text())
    assert got["pgid"] == got["pid"] != os.getpgid(0)


def test_command_agent_env_has_no_clawq_or_redis_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secrets = {
        "CLAWQ_REDIS_URL": "redis://:hunter2@10.0.0.1:6379/0", "REDIS_URL": "redis://:hunter2@10.0.0.1/1",
        "CLAWQ_NAMESPACE": "prod", "CLAWQ_RQ_REDIS_URL": "redis://rq", "CLAWQ_TELEGRAM_BOT_TOKEN": "123:abc",
        "REDIS_PASSWORD": "hunter2", "RQ_REDIS_URL": "redis://rq2",
    }
    keep = {"ANTHROPIC_API_KEY": "sk-ant-x", "OPENAI_API_KEY": "sk-x", "GEMINI_API_KEY": "g-x",
            "HOME": "/home/agent", "LANG": "C.UTF-8"}
    for k, v in {**secrets, **keep}.items():
        monkeypatch.setenv(k, v)
    record = tmp_path / "record.json"
    assert isinstance(run_command([sys.executable, PROBE, str(record), "done"], ctx()), Done)
    env = json.loads(record.read_text())["env"]
    for k in secrets:
        assert k not in env, k
    assert not [v for v in env.values() if "hunter2" in v]
    for k, v in keep.items():
        assert env[k] == v
    assert env["PATH"] == os.environ["PATH"]
    assert {k for k in env if k.startswith("CLAWQ_")} <= {
        "CLAWQ_TASK_ID", "CLAWQ_RUN_ID", "CLAWQ_MODEL", "CLAWQ_PROVIDER", "CLAWQ_BOARD", "CLAWQ_RUN_COUNT"}


def test_agent_env_pure() -> None:
    base = {"PATH": "/bin", "HOME": "/h", "CLAWQ_REDIS_URL": "redis://x", "REDIS_URL": "redis://y",
            "CLAWQ_NAMESPACE": "n", "OPENAI_API_KEY": "k", "CLAWQ_TASK_ID": "999"}
    env = agent_env(task_doc(), base)
    assert env == {"PATH": "/bin", "HOME": "/h", "OPENAI_API_KEY": "k", "CLAWQ_TASK_ID": "12",
                   "CLAWQ_RUN_ID": RUN_ID, "CLAWQ_MODEL": "codex", "CLAWQ_PROVIDER": "openai",
                   "CLAWQ_BOARD": "web", "CLAWQ_RUN_COUNT": "2"}
    assert base["CLAWQ_TASK_ID"] == "999", "the worker's own env is not touched"


def test_timeout_kills_the_whole_process_group(tmp_path: Path, reaper: list[int]) -> None:
    record = tmp_path / "record.json"
    c = ctx(timeout_s=1.5)
    box: list[Any] = []
    runner = threading.Thread(target=lambda: box.append(run_command([sys.executable, PROBE, str(record), "sleep"], c)))
    start = time.monotonic()
    runner.start()
    child = wait_for(Path(f"{record}.child"))["pid"]
    agent = json.loads(record.read_text())["pid"]
    reaper.extend([child, agent])
    assert alive(child) and alive(agent)
    runner.join(15)
    elapsed = time.monotonic() - start
    assert not runner.is_alive()
    result = box[0]
    assert isinstance(result, Failed) and result.cause == "timeout", result
    assert 1.4 <= elapsed < 8, elapsed
    assert wait_dead(agent), "the agent survived its timeout"
    assert wait_dead(child), "the agent's child survived: the process group was not killed"


def test_stop_kills_the_agent_and_returns_none(tmp_path: Path, reaper: list[int]) -> None:
    record = tmp_path / "record.json"
    c = ctx(timeout_s=60)
    box: list[Any] = []
    runner = threading.Thread(target=lambda: box.append(run_command([sys.executable, PROBE, str(record), "sleep"], c)))
    runner.start()
    child = wait_for(Path(f"{record}.child"))["pid"]
    agent = json.loads(record.read_text())["pid"]
    reaper.extend([child, agent])
    t0 = time.monotonic()
    c.stop.set()
    runner.join(10)
    assert not runner.is_alive() and box == [None]
    assert time.monotonic() - t0 < 3
    assert wait_dead(agent) and wait_dead(child)


def _run_in_thread(argv: list[str], c: RunContext) -> tuple[threading.Thread, list[Any]]:
    box: list[Any] = []
    runner = threading.Thread(target=lambda: box.append(run_command(argv, c)), daemon=True)
    runner.start()
    return runner, box


def test_timeout_kills_a_child_that_left_the_session_and_holds_the_pipes(tmp_path: Path, reaper: list[int]) -> None:
    """A setsid child escapes the process group and keeps stdout/stderr open: reading the agent's output must
    not wait for it, the timeout holds, and the child dies too."""
    record = tmp_path / "record.json"
    start = time.monotonic()
    runner, box = _run_in_thread([sys.executable, PROBE, str(record), "escape"], ctx(timeout_s=1.5))
    child = wait_for(Path(f"{record}.child"))["pid"]
    agent = json.loads(record.read_text())["pid"]
    reaper.extend([child, agent])
    assert os.getsid(child) == child != os.getsid(agent), "the child did not leave the agent's session"
    runner.join(8)
    elapsed = time.monotonic() - start
    assert not runner.is_alive(), "reading the agent's output blocked past the timeout"
    assert isinstance(box[0], Failed) and box[0].cause == "timeout", box
    assert 1.4 <= elapsed < 4.5, elapsed
    assert wait_dead(agent), "the agent survived its timeout"
    assert wait_dead(child), "the child that left the session survived the timeout"


def test_stop_kills_a_child_that_left_the_session(tmp_path: Path, reaper: list[int]) -> None:
    record = tmp_path / "record.json"
    c = ctx(timeout_s=60)
    runner, box = _run_in_thread([sys.executable, PROBE, str(record), "escape"], c)
    child = wait_for(Path(f"{record}.child"))["pid"]
    reaper.extend([child, json.loads(record.read_text())["pid"]])
    t0 = time.monotonic()
    c.stop.set()
    runner.join(8)
    assert not runner.is_alive() and box == [None]
    assert time.monotonic() - t0 < 3
    assert wait_dead(child), "fencing left the escaped child running"


def test_an_agent_that_daemonizes_and_exits_leaves_nothing_behind(tmp_path: Path, reaper: list[int]) -> None:
    """fork, setsid, fork: the daemon is in no process group of the agent and its parent is gone; it holds the
    pipes. The run's outcome comes at once, and the daemon is killed."""
    record = tmp_path / "record.json"
    t0 = time.monotonic()
    runner, box = _run_in_thread([sys.executable, PROBE, str(record), "daemon"], ctx(timeout_s=60))
    daemon = wait_for(Path(f"{record}.child"))["pid"]
    reaper.append(daemon)
    runner.join(8)
    assert not runner.is_alive(), "the runner waited for the daemon that holds the pipes"
    assert isinstance(box[0], Done) and box[0].outcome.summary == "probe done", box
    assert time.monotonic() - t0 < 5
    assert wait_dead(daemon), "the agent's daemon outlived its run"


def test_missing_binary_is_agent_unreachable(tmp_path: Path) -> None:
    result = run_command([str(tmp_path / "no-such-agent"), "--flag"], ctx())
    assert isinstance(result, Failed) and result.cause == "agent_unreachable"
    assert "no-such-agent" in result.error


def test_not_executable_is_agent_unreachable(tmp_path: Path) -> None:
    script = tmp_path / "agent.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    result = run_command([str(script)], ctx())
    assert isinstance(result, Failed) and result.cause == "agent_unreachable"


def test_run_agent_without_a_command_is_agent_unreachable() -> None:
    result = run_agent(AgentConfig(runner="command", command=[]), ctx())
    assert isinstance(result, Failed) and result.cause == "agent_unreachable"


def test_run_agent_uses_the_configured_command(tmp_path: Path) -> None:
    record = tmp_path / "record.json"
    result = run_agent(AgentConfig(command=[sys.executable, PROBE, str(record), "done"]), ctx())
    assert isinstance(result, Done) and record.exists()


def test_stderr_429_with_exit_1_is_a_rate_limit(tmp_path: Path) -> None:
    text = "429 Too Many Requests. Please try again in 2s"
    before = time.time()
    result = run_command([sys.executable, PROBE, str(tmp_path / "r"), "stderr", text, "1"], ctx())
    assert isinstance(result, RateLimited)
    assert result.reset_at is not None and before + 1.5 < result.reset_at < time.time() + 2.5


def test_stderr_failure_is_kept_in_the_error_and_log(tmp_path: Path) -> None:
    c = ctx()
    result = run_command([sys.executable, PROBE, str(tmp_path / "r"), "stderr", "fatal: not a git repository", "128"],
                         c)
    assert isinstance(result, Failed) and result.cause == "failed"
    assert "exit code 128" in result.error and "not a git repository" in result.error
    assert any("not a git repository" in ln for ln in c.log)


def test_agent_log_lines_are_kept_but_not_the_outcome_line(tmp_path: Path) -> None:
    c = ctx()
    run_command([sys.executable, PROBE, str(tmp_path / "r"), "done"], c)
    assert c.log == ["agent log: working"]


def test_command_runner_closes_its_pipes(tmp_path: Path) -> None:
    # Garbage that earlier tests left (CI once met a Redis client's socket here, collected by this test's
    # gc.collect) is collected first and not counted: only what run_command leaves behind is.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_command([sys.executable, PROBE, str(tmp_path / "r"), "done"], ctx())
        gc.collect()
    assert isinstance(result, Done)
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []


def test_timeout_holds_when_the_agent_never_reads_a_large_stdin(tmp_path: Path, reaper: list[int]) -> None:
    record = tmp_path / "record.json"
    c = ctx(timeout_s=0.5, prompt="p" * 200_000)
    start = time.monotonic()
    result = run_command([sys.executable, PROBE, str(record), "nostdin", "4"], c)
    reaper.append(json.loads(record.read_text())["pid"])
    assert time.monotonic() - start < 3, "the timeout was not enforced"
    assert isinstance(result, Failed) and result.cause == "timeout"


# -- the python runner -----------------------------------------------------------------------------
def python(name: str, timeout_s: float = 10.0, c: RunContext | None = None) -> Any:
    return run_agent(AgentConfig(runner="python", callable=f"agents.py_agent:{name}"), c or ctx(timeout_s))


def test_python_runner_dict() -> None:
    py_agent.CALLS.clear()
    result = python("done")
    assert isinstance(result, Done) and result.outcome.summary == "did fix the login"
    assert py_agent.CALLS and py_agent.CALLS[0]["run_id"] == RUN_ID


def test_python_runner_follow_up_and_clawtrol() -> None:
    for name in ("follow_up", "clawtrol"):
        result = python(name)
        assert isinstance(result, Done) and result.outcome.needs_follow_up and result.outcome.next_prompt


def test_python_runner_outcome_object() -> None:
    result = python("outcome")
    assert isinstance(result, Done) and result.outcome.summary == "an Outcome object"


def test_python_runner_rate_limited_doc() -> None:
    result = python("rate_limited")
    assert isinstance(result, RateLimited) and result.retry_after == 30.0


def test_python_runner_raising_429_is_a_rate_limit() -> None:
    result = python("raises_429")
    assert isinstance(result, RateLimited) and result.reset_at is not None


def test_python_runner_raising_is_a_failure() -> None:
    result = python("raises")
    assert isinstance(result, Failed) and result.cause == "failed"
    assert "ValueError" in result.error and "the tests did not pass" in result.error


@pytest.mark.parametrize("name", ["returns_int", "returns_bad_doc"])
def test_python_runner_bad_return_is_bad_output(name: str) -> None:
    result = python(name)
    assert isinstance(result, Failed) and result.cause == "bad_output", result


@pytest.mark.parametrize("spec", ["agents.no_such_module:fn", "agents.py_agent:no_such_fn",
                                  "agents.py_agent:not_callable"])
def test_python_runner_bad_callable_is_a_failure_not_an_exception(spec: str) -> None:
    result = run_agent(AgentConfig(runner="python", callable=spec), ctx())
    assert isinstance(result, Failed)


def test_python_runner_huge_retry_is_bad_output() -> None:
    result = python("returns_huge_retry")
    assert isinstance(result, Failed) and result.cause == "bad_output"


def test_python_runner_timeout_and_stop() -> None:
    py_agent.RELEASE.clear()
    try:
        t0 = time.monotonic()
        result = python("blocks", timeout_s=0.3)
        assert isinstance(result, Failed) and result.cause == "timeout"
        assert time.monotonic() - t0 < 3
        c = ctx(30)
        threading.Timer(0.2, c.stop.set).start()
        t0 = time.monotonic()
        assert python("blocks", c=c) is None
        assert time.monotonic() - t0 < 3
    finally:
        py_agent.RELEASE.set()


def test_a_quick_python_agent_runs_on_the_main_thread_and_starts_no_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    # a forked work-horse that starts a thread pays for it in every page it copies after
    monkeypatch.setattr(runners, "_TICK_S", 5.0)  # a loaded machine cannot reach the first tick
    started: list[int] = []
    c = RunContext(task=task_doc(), timeout_s=10, on_start=lambda: started.append(1))
    before = {t.ident for t in threading.enumerate()}
    result = run_agent(AgentConfig(runner="python", callable="agents.py_agent:records"), c)
    assert isinstance(result, Done)
    assert py_agent.SEEN["thread"] == threading.main_thread().name
    assert set(py_agent.SEEN["idents"]) <= before  # no thread was started for it
    assert started == []  # it ended before its first tick: no heartbeat thread either


def test_a_python_agent_that_outlives_its_first_tick_starts_its_heartbeats_once() -> None:
    started: list[int] = []
    c = RunContext(task=task_doc(), timeout_s=10, on_start=lambda: started.append(1))
    result = run_agent(AgentConfig(runner="python", callable="agents.py_agent:slow_done"), c)
    assert isinstance(result, Done) and started == [1]


def test_the_timer_armed_before_a_python_agent_gets_its_handler_and_time_back() -> None:
    fired: list[float] = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(time.monotonic()))
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, 0)
    try:
        signal.setitimer(signal.ITIMER_REAL, 60)  # e.g. RQ's job timeout
        assert isinstance(python("slow_done"), Done)
        delay, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 50 < delay < 60 and fired == []
        signal.setitimer(signal.ITIMER_REAL, 0.1)  # one that comes due while the agent runs still fires
        assert isinstance(python("slow_done"), Done)
        end = time.monotonic() + 2
        while not fired and time.monotonic() < end:
            time.sleep(0.01)
        assert len(fired) == 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if old_delay:
            signal.setitimer(signal.ITIMER_REAL, old_delay, old_interval)


def test_a_stopped_python_agent_is_interrupted_even_when_it_swallows_exceptions() -> None:
    py_agent.SEEN.clear()
    c = ctx(30)
    threading.Timer(0.2, c.stop.set).start()
    t0 = time.monotonic()
    assert python("stubborn", c=c) is None
    assert time.monotonic() - t0 < 3  # raised into it again at every tick, until it gave up
    assert py_agent.SEEN["swallowed"] == 3  # it ran no longer than that: nothing is left running


def test_a_python_agent_off_the_main_thread_runs_in_a_thread_of_its_own() -> None:
    out: list[Any] = []
    worker = threading.Thread(target=lambda: out.append(python("records")))
    worker.start()
    worker.join(10)
    assert isinstance(out[0], Done) and py_agent.SEEN["thread"] == "clawq-python-agent"
    out.clear()
    py_agent.RELEASE.clear()
    try:
        worker = threading.Thread(target=lambda: out.append(python("blocks", timeout_s=0.3)))
        worker.start()
        worker.join(10)
        assert isinstance(out[0], Failed) and out[0].cause == "timeout"
    finally:
        py_agent.RELEASE.set()


# -- the simulated runner --------------------------------------------------------------------------
def sim_cfg(**over: Any) -> SimulatedAgentConfig:
    base: dict[str, Any] = {"seed": 7, "speed": 43200, "min_minutes": 0, "max_minutes": 0.01, "follow_up_rate": 0.3,
                            "fail_rate": 0.2, "rate_limit_rate": 0.2, "stall_rate": 0.1}
    base.update(over)
    return SimulatedAgentConfig.model_validate(base)


def fate(cfg: SimulatedAgentConfig, task: dict[str, Any]) -> tuple[Any, ...]:
    """What a simulated run did, without its wall-clock parts (reset times move with the clock)."""
    try:
        r = run_agent(AgentConfig(runner="simulated", simulated=cfg), RunContext(task=task, timeout_s=60))
    except Stalled:
        return ("stalled",)
    if isinstance(r, Done):
        return ("done", r.outcome.needs_follow_up, r.outcome.next_prompt, r.outcome.summary)
    if isinstance(r, RateLimited):
        return ("rate_limited", r.quota, r.reset_at is not None)
    assert isinstance(r, Failed)
    return ("failed", r.cause, r.error)


def tasks(n: int) -> list[dict[str, Any]]:
    return [task_doc(task_id=i, run_count=1 + i % 2, claim_index=i % 3, model=["codex", "sonnet"][i % 2])
            for i in range(1, n + 1)]


def test_simulated_runner_is_deterministic_for_a_seed() -> None:
    cfg = sim_cfg()
    first = [fate(cfg, t) for t in tasks(60)]
    assert [fate(cfg, t) for t in tasks(60)] == first
    kinds = {f[0] for f in first}
    assert {"done", "rate_limited", "failed", "stalled"} <= kinds, kinds
    assert [fate(sim_cfg(seed=8), t) for t in tasks(60)] != first, "the seed changes nothing"


def test_simulated_rate_limits_carry_a_parsed_reset() -> None:
    cfg = sim_cfg(rate_limit_rate=1.0, fail_rate=0, stall_rate=0)
    for t in tasks(12):
        assert fate(cfg, t) == ("rate_limited", False, True)


def test_simulated_plan_overrides_the_draw() -> None:
    cfg = sim_cfg(plan={"1:1": "fail", "2:2": "quota", "3:0": "follow_up"}, rate_limit_rate=0, fail_rate=0,
                  stall_rate=0, follow_up_rate=0)
    assert fate(cfg, task_doc(task_id=1, claim_index=1))[:2] == ("failed", "failed")
    assert fate(cfg, task_doc(task_id=2, claim_index=2)) == ("rate_limited", True, True)
    assert fate(cfg, task_doc(task_id=3, claim_index=0))[:2] == ("done", True)
    assert fate(cfg, task_doc(task_id=4, claim_index=0))[:2] == ("done", False)


def test_simulated_runner_stops_on_ctx_stop() -> None:
    cfg = sim_cfg(speed=1.0, min_minutes=30, max_minutes=30)  # 30 real seconds
    c = RunContext(task=task_doc(), timeout_s=120)
    threading.Timer(0.2, c.stop.set).start()
    t0 = time.monotonic()
    assert run_agent(AgentConfig(runner="simulated", simulated=cfg), c) is None
    assert time.monotonic() - t0 < 3


def test_simulated_runner_times_out() -> None:
    cfg = sim_cfg(speed=1.0, min_minutes=30, max_minutes=30)
    t0 = time.monotonic()
    result = simulated_result(cfg, task_doc(), threading.Event(), 0.3)
    assert isinstance(result, Failed) and result.cause == "timeout"
    assert time.monotonic() - t0 < 3
