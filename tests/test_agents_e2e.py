"""End to end with real agent CLIs' stand-ins: the fake ``claude``, ``codex``, ``gemini``, ``openclaw``,
``opencode`` and ``aider`` of tests/agents/ on PATH, and real ``clawq dispatch`` and ``clawq worker`` processes.

Each fake records its argv, cwd, env and stdin (``$FAKE_AGENT_DIR/calls.jsonl``); every check reads that
record and the broker, never the workers' internals.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis_servers import RedisServer

from clawq.broker import Broker, TaskStatus
from clawq.broker.config import Config
from clawq.sim.fleet import Fleet, alive

pytestmark = pytest.mark.slow

FAKES = Path(__file__).resolve().parent / "agents"
BINS = {"claude": "fake_claude.py", "codex": "fake_codex.py", "gemini": "fake_gemini.py",
        "openclaw": "fake_openclaw.py", "opencode": "fake_opencode.py", "aider": "fake_aider.py"}
SECRET = "zai-secret-d41d8cd98f00b204"
#: model -> (preset, the model name the CLI gets, its provider)
MODELS = {"opus": ("claude-code", "claude-opus-4-5", "anthropic"), "codex": ("codex", "gpt-5-codex", "openai"),
          "gemini3": ("gemini-cli", "gemini-3-pro-preview", "google"), "claw": ("openclaw", "zai/glm-4.7", "zai"),
          "oc": ("opencode", "anthropic/claude-sonnet-4-5", "oc"), "aid": ("aider", "gpt-4o", "aid"),
          "glm": ("claude-code", "glm-4.6", "zai2")}
WAIT_S = 60.0


def install_fakes(bindir: Path) -> None:
    """The fake CLIs under their real names (exec keeps the pid, so a kill reaches the fake itself)."""
    bindir.mkdir()
    for name, script in BINS.items():
        path = bindir / name
        path.write_text(f'#!/bin/sh\nexec {sys.executable} {FAKES / script} "$@"\n')
        path.chmod(0o755)


class AgentFleet(Fleet):
    def __init__(self, url: str, namespace: str, tmp: Path) -> None:
        install_fakes(tmp / "bin")
        self.fake_dir = tmp / "fake"
        env = {"PATH": f"{tmp / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}", "FAKE_AGENT_DIR": str(self.fake_dir),
               "FAKE_RESET_S": "3600", "ZAI_API_KEY": SECRET}
        super().__init__(url, namespace, tmp, extra_env=env, log_level="INFO")

    def calls(self) -> list[dict[str, Any]]:
        path = self.fake_dir / "calls.jsonl"
        return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []

    def start(self, workers: int = 2) -> None:
        self.dispatcher("dispatcher")
        for _ in range(workers):
            self.worker()

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{self.log_tail(n, 3000)}" for n in self.procs)


@pytest.fixture
def fleet(redis_url: str, r: redis.Redis, namespace: str, tmp_path: Path) -> Iterator[AgentFleet]:
    f = AgentFleet(redis_url, namespace, tmp_path)
    try:
        yield f
    finally:
        f.stop(grace_s=10)


@pytest.fixture
def admin(redis_url: str, namespace: str) -> Iterator[Broker]:
    b = Broker.from_url(redis_url, namespace)
    try:
        yield b
    finally:
        b.close()


def config(tmp: Path, queue: str, boards: dict[str, dict[str, Any]] | None = None, **over: Any) -> Config:
    doc: dict[str, Any] = {
        "night_mode": None,
        "queue": {"global_max_concurrent": 8},
        "models": {m: p for m, (_, _, p) in MODELS.items()},
        "limits": {"model_max_inflight": {}, "provider_max_inflight": {}},
        "chains": {"down": ["codex", "glm"], "claude_first": ["opus", "gemini3"], "gem_first": ["gemini3", "oc"]},
        "watchdog": {"stale_in_progress_minutes": 0.2, "heartbeat_grace_minutes": 0.1, "failure_cooldown_minutes": 0.01,
                     "rate_limit_cooldown_minutes": 0.05},
        "agent": {"runner": "command", "command": ["false"], "timeout_minutes": 1, "queue": queue},
        "agents": {m: {"preset": preset, "model": name} for m, (preset, name, _) in MODELS.items()},
        "boards": boards if boards is not None else {},
        "notify": {"log": True, "summary_interval_minutes": 0.02},
    }
    doc["agents"]["glm"] |= {"env": {"ANTHROPIC_BASE_URL": "https://api.z.ai/api/anthropic"},
                             "env_from": {"ANTHROPIC_AUTH_TOKEN": "ZAI_API_KEY"}}
    for key, value in over.items():
        doc[key] = {**doc.get(key, {}), **value} if isinstance(value, dict) else value
    return Config.model_validate(doc)


def workdirs(tmp: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for name in names:
        (tmp / "code" / name).mkdir(parents=True)
        out[name] = {"workdir": str(tmp / "code" / name), "env": {"BOARD_NAME": name}}
    return out


def wait_final(admin: Broker, fleet: AgentFleet, ids: list[int], timeout: float = WAIT_S) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if all(admin.get_task(t).status.final for t in ids):
            return
        time.sleep(0.2)
    states = {t: (admin.get_task(t).status.value, admin.get_task(t).last_error) for t in ids}
    raise AssertionError(f"not final after {timeout}s: {states}\n{fleet.logs()}")


def model_flag(call: dict[str, Any]) -> str:
    argv = call["argv"]
    return next(argv[i + 1] for i, a in enumerate(argv) if a in ("--model", "-m"))


# -- every preset, in its board's workdir ------------------------------------------------------------------
def test_every_preset_runs_in_its_boards_workdir_with_its_model(fleet: AgentFleet, admin: Broker,
                                                                 tmp_path: Path) -> None:
    boards = workdirs(tmp_path, [f"b-{m}" for m in MODELS])
    admin.load_config(config(tmp_path, f"q-{fleet.namespace}", boards))
    ids = {m: admin.add(f"b-{m}", f"Task for {m}", model=m, prompt="Please fix it. fake:done") for m in MODELS}
    fleet.start()
    wait_final(admin, fleet, list(ids.values()))
    calls = {c["env"]["CLAWQ_MODEL"]: c for c in fleet.calls()}
    assert set(calls) == set(MODELS)
    for model, (_preset, cli_model, _) in MODELS.items():
        call, task = calls[model], admin.get_task(ids[model])
        assert task.status is TaskStatus.IN_REVIEW and task.context[-1]["summary"].startswith("fake work done"), model
        assert call["cwd"] == boards[f"b-{model}"]["workdir"], model
        assert model_flag(call) == cli_model, (model, call["argv"])
        assert call["prompt"].startswith(f"Task for {model}") and "clawq-outcome" in call["prompt"]
        assert '"run_id"' not in call["stdin"] and task.runs[-1]["run_id"] not in call["prompt"], "task JSON sent"
        assert call["env"]["BOARD_NAME"] == f"b-{model}" and "CLAWQ_REDIS_URL" not in call["env"]
    assert "--skip-git-repo-check" in calls["codex"]["argv"]
    if os.geteuid() == 0:
        assert calls["opus"]["env"]["IS_SANDBOX"] == "1"
    glm = calls["glm"]["env"]
    assert glm["ANTHROPIC_AUTH_TOKEN"] == SECRET and glm["ANTHROPIC_BASE_URL"] == "https://api.z.ai/api/anthropic"
    assert "ANTHROPIC_AUTH_TOKEN" not in calls["opus"]["env"]

    shown = json.loads(fleet.run_cli("show", str(ids["opus"]), "--json").stdout)
    run = shown["runs"][-1]
    assert run["usage"] == {"input_tokens": 15638, "output_tokens": 6, "cost_usd": 0.0079825}
    assert (fleet.fake_dir / "sessions" / "claude" / run["session_id"]).exists()  # the id the CLI made
    codex_run = admin.get_task(ids["codex"]).runs[-1]
    assert codex_run["usage"] == {"input_tokens": 24763, "output_tokens": 122, "cost_usd": None}
    text = fleet.run_cli("show", str(ids["opus"])).stdout
    assert "session " + run["session_id"] in text and "$0.0080" in text

    from clawq.server.metrics import make_registry, render

    metrics = render(make_registry(admin)).decode()
    assert 'clawq_agent_tokens_total{board="b-opus",kind="input",model="opus"} 15638.0' in metrics
    assert 'clawq_agent_cost_usd_total{board="b-opus",model="opus"} 0.0079825' in metrics
    health = fleet.run_cli("health")
    assert "cost  " in health.stdout and "opus $0.01" in health.stdout, health.stdout

    seen = [fleet.run_cli("config", "show").stdout, fleet.run_cli("events", "-n", "500", "--json").stdout,
            json.dumps([admin.get_task(t).model_dump(mode="json") for t in ids.values()]), fleet.logs()]
    assert not any(SECRET in s for s in seen), "a secret copied by env_from leaked"


def test_a_follow_up_resumes_the_same_session_with_only_the_next_prompt(fleet: AgentFleet, admin: Broker,
                                                                        tmp_path: Path) -> None:
    resumable = ["opus", "codex", "gemini3", "oc"]
    admin.load_config(config(tmp_path, f"q-{fleet.namespace}", workdirs(tmp_path, resumable)))
    ids = {m: admin.add(m, f"Build {m}", model=m, prompt="fake:follow") for m in resumable}
    fleet.start()
    wait_final(admin, fleet, list(ids.values()))
    for model, tid in ids.items():
        task = admin.get_task(tid)
        assert task.status is TaskStatus.IN_REVIEW and task.run_count == 2, (model, task.last_error)
        first, second = [c for c in fleet.calls() if c["env"]["CLAWQ_TASK_ID"] == str(tid)]
        assert first["session"] is None and second["session"], model
        assert second["session"] == task.runs[0]["session_id"] == task.runs[1]["session_id"], model
        assert second["prompt"].startswith("fake:done now add the tests") and f"Build {model}" not in second["prompt"]
        assert "--continue" not in second["argv"] and "--last" not in second["argv"]


def test_a_usage_limit_cools_the_model_until_its_reset_and_the_task_moves_down(fleet: AgentFleet, admin: Broker,
                                                                                tmp_path: Path) -> None:
    admin.load_config(config(tmp_path, f"q-{fleet.namespace}", workdirs(tmp_path, ["web", "api"])))
    codex_task = admin.add("web", "Limit codex", chain="down", prompt="fake:usage@codex")
    claude_task = admin.add("api", "Limit claude", chain="claude_first", prompt="fake:usage@claude-code")
    fleet.start()
    wait_final(admin, fleet, [codex_task, claude_task])
    calls = fleet.calls()
    cooling = admin.cooldowns()
    t_codex = next(c["t"] for c in calls if c["cli"] == "codex")
    # Codex says "try again at H:MM PM" in local time: the cooldown ends on that minute
    assert t_codex + 3600 - 61 <= cooling["codex"]["until"] <= t_codex + 3600, cooling
    assert cooling["codex"]["reason"] == "quota_reached"
    t_claude = next(c["t"] for c in calls if c["cli"] == "claude" and c["scenario"] == "usage")
    assert cooling["opus"]["until"] == int(t_claude + 3600), cooling  # rate_limit_event.resetsAt, to the second
    for tid, limited, then in ((codex_task, "codex", "glm"), (claude_task, "opus", "gemini3")):
        task = admin.get_task(tid)
        assert task.status is TaskStatus.IN_REVIEW and task.attempts == 0
        assert [(r["model"], r["outcome"]) for r in task.runs] == [(limited, "quota_reached"), (then, "done")]


def test_auth_alerts_once_and_uses_no_attempt(fleet: AgentFleet, admin: Broker, tmp_path: Path) -> None:
    admin.load_config(config(tmp_path, f"q-{fleet.namespace}", workdirs(tmp_path, ["a1", "a2", "a3"]),
                             watchdog={"max_attempts": 1}))
    ids = [admin.add(b, f"auth {b}", chain="gem_first", prompt="fake:auth@gemini-cli") for b in ("a1", "a2", "a3")]
    fleet.start(workers=3)
    wait_final(admin, fleet, ids)
    for tid in ids:
        task = admin.get_task(tid)
        assert task.status is TaskStatus.IN_REVIEW and task.attempts == 0, task
        assert task.runs[-1]["model"] == "oc" and task.runs[-1]["outcome"] == "done"
    gemini_runs = [r for t in ids for r in admin.get_task(t).runs if r["model"] == "gemini3"]
    assert gemini_runs and all(r["outcome"] == "auth" for r in gemini_runs)
    cooling = admin.cooldowns()["gemini3"]
    assert cooling["reason"] == "auth" and 29 * 60 < cooling["remaining_s"] <= 30 * 60
    time.sleep(0.5)
    alerts = fleet.log_tail("dispatcher", 1 << 20).count("[agent_auth]")
    assert alerts == 1, fleet.log_tail("dispatcher")


def test_a_missing_workdir_releases_the_run_pauses_the_board_and_alerts(fleet: AgentFleet, admin: Broker,
                                                                        tmp_path: Path) -> None:
    gone = tmp_path / "code" / "gone"
    admin.load_config(config(tmp_path, f"q-{fleet.namespace}", {"web": {"workdir": str(gone)}}))
    tid = admin.add("web", "nowhere", model="opus", prompt="fake:done")
    fleet.start(workers=1)
    end = time.monotonic() + WAIT_S
    while time.monotonic() < end and not admin.health()["boards"]["web"]["paused"]:
        time.sleep(0.1)
    task = admin.get_task(tid)
    assert task.status is TaskStatus.UP_NEXT and task.attempts == 0 and task.last_error_reason == "workdir_missing"
    assert str(gone) in (task.last_error or "") and fleet.calls() == []
    time.sleep(1.0)
    log = fleet.log_tail("dispatcher", 1 << 20)
    assert log.count("[workdir_missing]") == 1 and str(gone) in log and "board web" in log
    gone.mkdir(parents=True)
    assert fleet.run_cli("resume", "web").returncode == 0
    wait_final(admin, fleet, [tid])
    assert admin.get_task(tid).status is TaskStatus.IN_REVIEW


@pytest.mark.parametrize("model", ["codex", "opus"])
def test_a_timeout_leaves_no_process_behind(fleet: AgentFleet, admin: Broker, tmp_path: Path,
                                            redis_server: RedisServer, model: str) -> None:
    if redis_server.name != "redis7":
        pytest.skip("one Redis binary is enough for this one")
    cfg = config(tmp_path, f"q-{fleet.namespace}", workdirs(tmp_path, ["slow"]), watchdog={"max_attempts": 1})
    agents = cfg.model_dump(mode="json")["agents"]
    agents[model]["timeout_minutes"] = 0.05
    admin.load_config(Config.model_validate({**cfg.model_dump(mode="json"), "agents": agents}))
    tid = admin.add("slow", "hang", model=model, prompt="fake:hang")
    fleet.start(workers=1)
    wait_final(admin, fleet, [tid])
    task = admin.get_task(tid)
    assert task.status is TaskStatus.FAILED and task.runs[-1]["outcome"] == "timeout"
    hangs = [json.loads(p.read_text()) for p in fleet.fake_dir.glob("hang.*[0-9]")]
    assert len(hangs) == 1
    assert not alive(hangs[0]["pid"]) and not alive(hangs[0]["child"]), "an agent process survived its timeout"
    got = (fleet.fake_dir / f"hang.{hangs[0]['pid']}.signals").read_text().split()
    assert got == (["SIGINT"] if model == "codex" else ["SIGTERM"]), got  # Codex stops cleanly on SIGINT


# -- config and agents check, through the CLI ------------------------------------------------------------
@pytest.mark.parametrize(("doc", "needle"), [
    ({"agents": {"opus": {"preset": "cursor"}}}, "agents.opus.preset"),
    ({"agents": {"gpt9": {"preset": "codex"}}}, "agents.gpt9: 'gpt9' is not a model"),
    ({"boards": {"web": {"workdir": "code/web"}}}, "must be an absolute path"),
    ({"boards": {"web": {"env": {"BAD-NAME": "1"}}}}, "bad environment variable name 'BAD-NAME'"),
    ({"agents": {"opus": {"preset": "codex", "env_from": {"TOKEN": "not a name"}}}}, "env_from.TOKEN"),
], ids=["unknown-preset", "agents-key-not-a-model", "relative-workdir", "bad-env-name", "bad-env-from"])
def test_config_load_refuses_bad_agents_and_boards_in_one_line(fleet: AgentFleet, admin: Broker, tmp_path: Path,
                                                               doc: dict[str, Any], needle: str) -> None:
    before = fleet.run_cli("config", "show", "--json").stdout
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(doc))
    out = fleet.run_cli("config", "load", str(path))
    assert out.returncode == 2 and needle in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert fleet.run_cli("config", "show", "--json").stdout == before


def test_workdir_expands_home_and_variables(fleet: AgentFleet, tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("boards:\n  web: {workdir: ~/code/web}\n  api: {workdir: $FAKE_AGENT_DIR/api}\n")
    assert fleet.run_cli("config", "load", str(path)).returncode == 0
    shown = json.loads(fleet.run_cli("config", "show", "--json").stdout)["boards"]
    assert shown["web"]["workdir"] == os.path.expanduser("~/code/web")
    assert shown["api"]["workdir"] == str(fleet.fake_dir / "api")


def test_agents_check_finds_each_cli_and_workdir_and_sends_no_prompt(fleet: AgentFleet, admin: Broker,
                                                                     tmp_path: Path) -> None:
    boards = workdirs(tmp_path, ["web"]) | {"gone": {"workdir": str(tmp_path / "nope")}}
    admin.load_config(config(tmp_path, f"q-{fleet.namespace}", boards))
    out = fleet.run_cli("agents", "check", "--json")
    doc = json.loads(out.stdout)
    assert out.returncode == 1 and not doc["ok"]
    assert doc["models"]["opus"]["version"] == "2.1.240 (Claude Code)" and doc["models"]["opus"]["ok"]
    assert doc["models"]["codex"]["path"] == str(tmp_path / "bin" / "codex")
    assert all(doc["models"][m]["ok"] for m in MODELS) and doc["boards"] == {
        "web": {"workdir": boards["web"]["workdir"], "exists": True},
        "gone": {"workdir": str(tmp_path / "nope"), "exists": False}}
    assert fleet.calls() == [], "agents check sent a prompt"
    table = fleet.run_cli("agents", "check").stdout
    assert "MISSING" in table and "gemini-cli" in table and "codex-cli 0.101.0" in table
    boards.pop("gone")
    admin.load_config(config(tmp_path, f"q-{fleet.namespace}", boards))
    assert fleet.run_cli("agents", "check").returncode == 0
