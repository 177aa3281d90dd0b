"""The ``clawq`` CLI contract: JSON shapes, exit codes, one-line errors, refused commands write nothing.

Most tests run the CLI in-process (``cli.main(argv)``, output through ``capsys``) against the private
Redis of the session; a few run it as a real process to prove that no traceback reaches the terminal.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from clawq import cli
from clawq.broker import Config, Task

ROOT = Path(__file__).resolve().parent.parent
#: Nothing listens on port 1: every connection is refused at once.
UNREACHABLE = "redis://127.0.0.1:1/0"
MAX_TEXT = 256 * 1024

Result = tuple[int, str, str]
Run = Callable[..., Result]


# -- helpers -------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _no_ambient_clawq_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A test that forgets --redis-url reaches nothing (never the shared 127.0.0.1:6379)."""
    monkeypatch.setenv("CLAWQ_REDIS_URL", UNREACHABLE)
    monkeypatch.delenv("CLAWQ_NAMESPACE", raising=False)


@pytest.fixture
def run(redis_url: str, r: redis.Redis, namespace: str, capsys: pytest.CaptureFixture[str]) -> Run:
    """``run(*args) -> (exit code, stdout, stderr)`` of ``clawq --redis-url <private> --namespace <ns> args``.

    ``url=None`` / ``ns=None`` leave the option out (the environment or a later option decides).
    """

    def _run(*args: str, url: str | None = redis_url, ns: str | None = namespace) -> Result:
        argv: list[str] = []
        if url is not None:
            argv += ["--redis-url", url]
        if ns is not None:
            argv += ["--namespace", ns]
        argv += list(args)
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        out, err = capsys.readouterr()
        code = exc.value.code
        assert isinstance(code, int), f"exit code {code!r} is not an int"
        return code, out, err

    return _run


def ok(run: Run, *args: str) -> Any:
    """Run with --json after the command; expect exit 0, no stderr, one JSON document; return it."""
    code, out, err = run(*args, "--json")
    assert (code, err) == (0, ""), f"clawq {' '.join(args)} -> exit {code}: {err}"
    return json.loads(out)


def assert_one_line_error(code: int, expected: int, out: str, err: str) -> None:
    assert code == expected, f"exit {code}, expected {expected}; stderr: {err!r}"
    assert "Traceback" not in err and "Traceback" not in out
    assert err.endswith("\n") and err.count("\n") == 1, f"stderr is not one line: {err!r}"
    assert err.startswith("clawq: ") and len(err.strip()) > len("clawq:")


def assert_int(value: Any) -> None:
    assert isinstance(value, int) and not isinstance(value, bool), f"{value!r} is not a JSON integer"


def _stream(r: redis.Redis, key: bytes) -> Any:
    return r.xinfo_stream(key)["last-generated-id"], r.xrange(key)


_READERS: dict[bytes, Callable[[redis.Redis, bytes], Any]] = {
    b"string": lambda r, k: r.get(k),
    b"hash": lambda r, k: sorted(r.hgetall(k).items()),
    b"list": lambda r, k: r.lrange(k, 0, -1),
    b"set": lambda r, k: sorted(r.smembers(k)),
    b"zset": lambda r, k: r.zrange(k, 0, -1, withscores=True),
    b"stream": _stream,
}


def snapshot(r: redis.Redis) -> dict[bytes, tuple[bytes, bool, Any]]:
    """Every key of the database: type, whether it expires, and its whole value."""
    snap: dict[bytes, tuple[bytes, bool, Any]] = {}
    for key in r.scan_iter(count=1000):
        kind = r.type(key)
        snap[key] = (kind, r.pttl(key) >= 0, _READERS[kind](r, key))
    return snap


def new_uuid() -> str:
    return str(uuid.uuid4())


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def add(run: Run, board: str, *extra: str, title: str = "a task") -> int:
    doc = ok(run, "add", "--board", board, *(extra or ("--chain", "coding")), title)
    return int(doc["task_id"])


def claim(run: Run) -> dict[str, Any]:
    doc = ok(run, "claim")
    assert doc["claimed"] is True
    return dict(doc)


# -- happy paths and JSON shapes -----------------------------------------------------------------------
CLAIM_KEYS = {"claimed", "task_id", "board", "model", "provider", "run_id", "run_count", "attempt"}


def test_add_json_shape(run: Run) -> None:
    code, out, err = run("add", "--board", "b1", "--chain", "coding", "--prompt", "do it", "Title", "--json")
    assert (code, err) == (0, "")
    assert out.count("\n") == 1
    doc = json.loads(out)
    assert doc == {"task_id": 1, "board": "b1", "status": "up_next"}
    assert_int(doc["task_id"])
    assert ok(run, "add", "--board", "b1", "--model", "opus", "--id", "40", "Pinned") == {
        "task_id": 40, "board": "b1", "status": "up_next"}
    assert ok(run, "add", "--board", "b2", "--chain", "bulk", "Next")["task_id"] == 41


def test_add_accepts_the_board_and_text_limits(run: Run) -> None:
    board = "A-z_0.9" + "x" * 57
    assert len(board) == 64
    tid = add(run, board, "--chain", "coding", "--prompt", "p" * MAX_TEXT, title="é " * 10)
    task = ok(run, "show", str(tid))
    assert task["board"] == board and len(task["prompt"]) == MAX_TEXT and task["title"] == "é " * 10


def test_add_without_json_prints_one_human_line(run: Run) -> None:
    code, out, err = run("add", "--board", "b1", "--chain", "coding", "t")
    assert (code, err) == (0, "")
    assert out.count("\n") == 1 and "1" in out and "b1" in out


def test_full_cycle_follow_up_then_in_review(run: Run) -> None:
    assert add(run, "b1") == 1
    assert add(run, "b1") == 2
    first = claim(run)
    assert set(first) == CLAIM_KEYS
    assert first["task_id"] == 1 and first["board"] == "b1"
    assert (first["model"], first["provider"]) == ("codex", "openai")
    assert (first["run_count"], first["attempt"]) == (1, 1)
    assert str(uuid.UUID(first["run_id"])) == first["run_id"]
    for key in ("task_id", "run_count", "attempt"):
        assert_int(first[key])

    beat = ok(run, "heartbeat", "1", first["run_id"])
    assert set(beat) == {"task_id", "run_id", "lease_deadline"}
    assert beat["task_id"] == 1 and beat["lease_deadline"] > time.time()

    done = ok(run, "complete", "1", first["run_id"], "--follow-up", "--next-prompt", "go on",
              "--summary", "s1")
    assert done == {"task_id": 1, "status": "up_next", "run_count": 1}

    second = claim(run)  # the same task again, ahead of task 2 on its board
    assert (second["task_id"], second["run_count"], second["attempt"]) == (1, 2, 1)
    assert second["run_id"] != first["run_id"]

    final = ok(run, "complete", "1", second["run_id"], "--summary", "all done")
    assert final == {"task_id": 1, "status": "in_review", "run_count": 2}
    assert_int(final["task_id"])

    task = ok(run, "show", "1")
    assert task["status"] == "in_review" and task["run_count"] == 2
    assert [c["summary"] for c in task["context"]] == ["s1", "all done"]
    assert task["context"][0]["next_prompt"] == "go on"
    assert [x["run_id"] for x in task["runs"]] == [first["run_id"], second["run_id"]]
    assert claim(run)["task_id"] == 2


def test_complete_repeated_and_fenced(run: Run) -> None:
    add(run, "b1")
    c = claim(run)
    assert ok(run, "complete", "1", c["run_id"], "--summary", "x")["status"] == "in_review"
    again = ok(run, "complete", "1", c["run_id"], "--summary", "x")
    assert again["status"] == "in_review" and again.get("repeated") is True
    code, out, err = run("complete", "1", c["run_id"], "--summary", "something else")
    assert_one_line_error(code, 4, out, err)
    code, out, err = run("heartbeat", "1", c["run_id"])
    assert_one_line_error(code, 4, out, err)


def test_follow_up_limit_sends_to_in_review(run: Run, tmp_path: Path) -> None:
    ok(run, "config", "load", write(tmp_path / "c.yaml", "followup: {max_runs: 2}\n"))
    add(run, "b1")
    c = claim(run)
    assert ok(run, "complete", "1", c["run_id"], "--follow-up", "--next-prompt", "n")["status"] == "up_next"
    c = claim(run)
    done = ok(run, "complete", "1", c["run_id"], "--follow-up", "--next-prompt", "n")
    assert (done["status"], done["run_count"]) == ("in_review", 2)
    assert "note" in done


def test_claim_nothing_exits_3_with_skip_reasons(run: Run) -> None:
    code, out, err = run("claim", "--json")
    assert_one_line_error(code, 3, out, err)
    assert json.loads(out) == {"claimed": False, "skip_reasons": {}}
    add(run, "b1")
    add(run, "b1")
    claim(run)
    code, out, err = run("claim", "--json")
    assert_one_line_error(code, 3, out, err)
    assert json.loads(out) == {"claimed": False, "skip_reasons": {"board_busy": 1}}
    code, out, err = run("claim")
    assert_one_line_error(code, 3, out, err)
    assert out == ""


def test_fail_flow(run: Run) -> None:
    add(run, "b1")
    c = claim(run)
    doc = ok(run, "fail", "1", c["run_id"], "--reason", "boom")
    assert doc == {"task_id": 1, "status": "up_next", "attempts": 1}
    code, out, _ = run("claim", "--json")
    assert code == 3 and json.loads(out)["skip_reasons"] == {"backoff": 1}
    task = ok(run, "show", "1")
    assert (task["status"], task["attempts"], task["last_error"]) == ("up_next", 1, "boom")
    code, out, err = run("fail", "1", c["run_id"], "--reason", "again")
    assert_one_line_error(code, 4, out, err)

    add(run, "b2")
    c2 = claim(run)
    assert c2["task_id"] == 2
    assert ok(run, "fail", "2", c2["run_id"], "--reason", "fatal", "--no-retry") == {
        "task_id": 2, "status": "failed", "attempts": 1}
    assert [t["task_id"] for t in ok(run, "ls", "--status", "failed")] == [2]
    errors = ok(run, "health")["recent_errors"]
    assert [(e["task_id"], e["message"]) for e in errors] == [(2, "fatal"), (1, "boom")]
    assert all(set(e) == {"reason", "task_id", "board", "model", "message", "at"} for e in errors)


def test_rate_limited_flow(run: Run) -> None:
    add(run, "b1")
    c = claim(run)
    before = time.time()
    doc = ok(run, "rate-limited", "1", c["run_id"], "--retry-after", "120", "--message", "429 slow down")
    assert set(doc) == {"task_id", "status", "model", "cooldown_until"}
    assert (doc["task_id"], doc["status"], doc["model"]) == (1, "up_next", "codex")
    assert before + 119 <= doc["cooldown_until"] <= time.time() + 121
    cooling = ok(run, "cooldown", "ls")
    assert list(cooling) == ["codex"] and 0 < cooling["codex"]["remaining_s"] <= 120
    again = claim(run)  # no attempt used; the chain falls through to its next model
    assert (again["task_id"], again["model"], again["attempt"], again["run_count"]) == (1, "sonnet", 1, 1)
    health = ok(run, "health")
    assert health["models"]["codex"]["cooldown_remaining_s"] > 0
    assert health["models"]["codex"]["failures"] == 1
    assert health["recent_errors"][0]["reason"] == "rate_limit"
    assert ok(run, "cooldown", "clear", "codex") == {"model": "codex", "until": None}
    assert ok(run, "cooldown", "ls") == {}


def test_rate_limited_pinned_model_blocks_its_board(run: Run) -> None:
    add(run, "b1", "--model", "opus")
    c = claim(run)
    doc = ok(run, "rate-limited", "1", c["run_id"])  # no retry-after: rate_limit_cooldown_minutes
    assert doc["model"] == "opus" and doc["cooldown_until"] > time.time() + 9 * 60
    code, out, _ = run("claim", "--json")
    assert code == 3 and json.loads(out)["skip_reasons"] == {"model_rate_limited": 1}


def test_reap_flow(run: Run, tmp_path: Path) -> None:
    cfg = "watchdog: {stale_in_progress_minutes: 0.005, heartbeat_grace_minutes: 0}\n"
    ok(run, "config", "load", write(tmp_path / "c.yaml", cfg))
    assert ok(run, "reap") == {"requeued": []}
    add(run, "b1")
    c = claim(run)
    time.sleep(0.6)
    assert ok(run, "reap") == {"requeued": [1]}
    assert ok(run, "reap") == {"requeued": []}
    task = ok(run, "show", "1")
    assert (task["status"], task["attempts"]) == ("up_next", 1)
    code, out, err = run("heartbeat", "1", c["run_id"])
    assert_one_line_error(code, 4, out, err)
    assert claim(run)["attempt"] == 2


def test_cancel(run: Run) -> None:
    add(run, "b1")
    assert ok(run, "cancel", "1") == {"task_id": 1, "status": "cancelled", "was": "up_next"}
    add(run, "b1")
    c = claim(run)
    assert ok(run, "cancel", "2")["was"] == "in_progress"
    code, out, err = run("complete", "2", c["run_id"])
    assert_one_line_error(code, 4, out, err)
    assert [t["status"] for t in ok(run, "ls")] == ["cancelled", "cancelled"]


def test_pause_and_resume(run: Run) -> None:
    add(run, "b1")
    assert ok(run, "pause", "b1") == {"board": "b1", "paused": True}
    code, out, _ = run("claim", "--json")
    assert code == 3 and json.loads(out)["skip_reasons"] == {"board_paused": 1}
    assert ok(run, "resume", "b1") == {"board": "b1", "paused": False}
    assert claim(run)["task_id"] == 1


def test_cooldown_set_and_ls(run: Run) -> None:
    before = time.time()
    doc = ok(run, "cooldown", "set", "opus", "60")
    assert set(doc) == {"model", "until"} and doc["model"] == "opus"
    assert before + 59 <= doc["until"] <= time.time() + 61
    cooling = ok(run, "cooldown", "ls")
    assert set(cooling) == {"opus"} and set(cooling["opus"]) == {"until", "remaining_s", "reason"}
    assert ok(run, "cooldown", "set", "opus", "0")["model"] == "opus"
    assert ok(run, "cooldown", "ls") == {}


def test_ls_json(run: Run) -> None:
    assert ok(run, "ls") == []
    add(run, "b1")
    add(run, "b2", "--model", "glm")
    claim(run)
    rows = ok(run, "ls")
    assert [t["task_id"] for t in rows] == [1, 2]
    assert all(isinstance(t, dict) and "prompt" not in t and "runs" not in t for t in rows)
    assert [t["task_id"] for t in ok(run, "ls", "--board", "b2")] == [2]
    assert [t["task_id"] for t in ok(run, "ls", "--status", "in_progress")] == [1]
    assert ok(run, "ls", "--board", "b2", "--status", "in_progress") == []


def test_show_json_shape(run: Run) -> None:
    add(run, "b1", "--model", "opus", title="Hello")
    doc = ok(run, "show", "1")
    assert set(doc) == set(Task.model_fields)
    assert_int(doc["task_id"])
    assert (doc["title"], doc["model"], doc["chain"], doc["status"]) == ("Hello", "opus", None, "up_next")


def test_events_json(run: Run) -> None:
    add(run, "b1")
    claim(run)
    rows = ok(run, "events")
    assert isinstance(rows, list) and [e["type"] for e in rows][-2:] == ["added", "claimed"]
    assert all({"id", "type", "at"} <= set(e) for e in rows)
    added = rows[-2]
    assert added["board"] == "b1"
    assert_int(added["task_id"])
    assert [e["type"] for e in ok(run, "events", "-n", "1")] == ["claimed"]


def test_config_show_and_load(run: Run, tmp_path: Path) -> None:
    shown = ok(run, "config", "show")
    assert shown == Config().model_dump(mode="json")
    code, out, err = run("config", "show")
    assert (code, err) == (0, "")
    assert yaml.safe_load(out) == shown
    loaded = ok(run, "config", "load", write(tmp_path / "c.yaml", "queue: {global_max_concurrent: 9}\n"))
    assert loaded["loaded"] is True
    assert_int(loaded["version"])
    assert ok(run, "config", "show")["queue"]["global_max_concurrent"] == 9


def test_health_json_shape(run: Run) -> None:
    add(run, "b1")
    add(run, "b1")
    claim(run)
    doc = ok(run, "health")
    assert set(doc) == {"global", "boards", "models", "providers", "usage", "recent_errors", "namespace", "redis"}
    cap, night = Config().global_cap_at(time.time())
    assert doc["global"] == {"max_concurrent": cap, "in_progress": 1, "night": night, "scheduled": 0}
    board = doc["boards"]["b1"]
    assert {"queue_depth", "in_progress", "completed_last_hour", "oldest_waiting_s"} <= set(board)
    assert (board["queue_depth"], board["in_progress"], board["completed_last_hour"]) == (1, 1, 0)
    assert board["oldest_waiting_s"] >= 0
    assert set(doc["models"]) == set(Config().models)
    assert {"inflight", "cap", "cooldown_remaining_s", "failures"} <= set(doc["models"]["codex"])
    assert (doc["models"]["codex"]["inflight"], doc["models"]["codex"]["cap"]) == (1, 2)
    assert doc["providers"]["openai"] == {"inflight": 1, "cap": 3, "breaker": {
        "state": "closed", "remaining_s": 0.0, "until": None, "cause": None, "probe_task": None}}
    assert doc["recent_errors"] == [] and doc["usage"] == {}


def test_health_json_has_the_contract_keys(run: Run) -> None:
    """The contract keys, plus documented extras (running_task, paused, state, why_waiting, head, running,
    scheduled)."""
    add(run, "b1")
    doc = ok(run, "health")
    assert set(doc["global"]) == {"max_concurrent", "in_progress", "night", "scheduled"}
    assert set(doc["providers"]["openai"]) == {"inflight", "cap", "breaker"}
    assert set(doc["boards"]["b1"]) == {
        "queue_depth", "in_progress", "completed_last_hour", "oldest_waiting_s", "running_task", "paused", "state",
        "why_waiting", "head", "running", "scheduled"}
    assert set(doc["models"]["codex"]) == {"inflight", "cap", "cooldown_remaining_s", "failures", "provider"}


def test_snapshot_sees_values_ttls_and_events(run: Run, r: redis.Redis, namespace: str) -> None:
    """The keyspace check of the bad-input tests is not blind: a heartbeat, a cooldown, an event all show."""
    add(run, "b1")
    c = claim(run)
    before = snapshot(r)
    ok(run, "heartbeat", "1", c["run_id"])
    assert snapshot(r) != before
    events = f"clawq:{{{namespace}}}:events".encode()
    before = snapshot(r)
    r.xdel(events, r.xadd(events, {"type": "probe"}))
    after = snapshot(r)
    assert after[events][2][1] == before[events][2][1]  # the same entries...
    assert after != before  # ...but an event was written: the stream's last id moved
    before = snapshot(r)
    ok(run, "cooldown", "set", "opus", "60")
    after = snapshot(r)
    cooldown = f"clawq:{{{namespace}}}:cooldown:opus".encode()
    assert cooldown not in before and after[cooldown][:2] == (b"string", True)
    assert after[events] != before[events]


# -- global options and environment --------------------------------------------------------------------
def test_env_vars_select_redis_and_namespace(
    run: Run, monkeypatch: pytest.MonkeyPatch, redis_url: str, namespace: str, r: redis.Redis
) -> None:
    monkeypatch.setenv("CLAWQ_REDIS_URL", redis_url)
    monkeypatch.setenv("CLAWQ_NAMESPACE", namespace)
    code, out, err = run("add", "--board", "b1", "--chain", "coding", "t", "--json", url=None, ns=None)
    assert (code, err) == (0, "") and json.loads(out)["task_id"] == 1
    assert r.exists(f"clawq:{{{namespace}}}:task:1") == 1


def test_global_options_after_the_command(run: Run, redis_url: str, namespace: str, r: redis.Redis) -> None:
    opts = ["--redis-url", redis_url, "--namespace", namespace, "--json"]
    code, out, err = run("add", "--board", "b1", "--chain", "coding", "t", *opts, url=None, ns=None)
    assert (code, err) == (0, "") and json.loads(out)["task_id"] == 1
    code, out, err = run("cooldown", "ls", *opts, url=None, ns=None)
    assert (code, err, json.loads(out)) == (0, "", {})
    assert r.exists(f"clawq:{{{namespace}}}:task:1") == 1


def test_option_after_the_command_wins_over_env_and_group(
    run: Run, monkeypatch: pytest.MonkeyPatch, namespace: str, r: redis.Redis
) -> None:
    monkeypatch.setenv("CLAWQ_NAMESPACE", "from-env")
    code, _, err = run("add", "--board", "b1", "--chain", "coding", "t", "--namespace", namespace)
    assert (code, err) == (0, "")
    assert r.exists(f"clawq:{{{namespace}}}:task:1") == 1
    assert not list(r.scan_iter("clawq:{from-env}:*"))


def test_default_namespace_from_env_is_used_without_option(
    run: Run, monkeypatch: pytest.MonkeyPatch, r: redis.Redis
) -> None:
    monkeypatch.setenv("CLAWQ_NAMESPACE", "envns")
    code, _, err = run("add", "--board", "b1", "--chain", "coding", "t", ns=None)
    assert (code, err) == (0, "")
    assert r.exists("clawq:{envns}:task:1") == 1


# -- bad input: exit code, one line, nothing written -----------------------------------------------------
BAD_BOARDS = ["a b", "a:b", "{x}", "*", "", "x" * 65, "é"]
_ADD = ["add", "--chain", "coding"]

BAD_INPUTS: list[tuple[str, list[str], int]] = [
    ("unknown-command", ["frobnicate"], 2),
    ("unknown-option", ["ls", "--frob"], 2),
    ("add-missing-board", ["add", "--chain", "coding", "t"], 2),
    ("add-missing-title", ["add", "--board", "b9", "--chain", "coding"], 2),
    ("add-chain-and-model", ["add", "--board", "b9", "--chain", "coding", "--model", "opus", "t"], 2),
    ("add-neither-chain-nor-model", ["add", "--board", "b9", "t"], 2),
    ("add-unknown-chain", ["add", "--board", "b9", "--chain", "nochain", "t"], 2),
    ("add-unknown-model", ["add", "--board", "b9", "--model", "gpt9", "t"], 2),
    ("add-duplicate-id", [*_ADD, "--board", "b9", "--id", "1", "t"], 2),
    ("add-id-0", [*_ADD, "--board", "b9", "--id", "0", "t"], 2),
    ("add-id-negative", [*_ADD, "--board", "b9", "--id", "-1", "t"], 2),
    ("add-id-abc", [*_ADD, "--board", "b9", "--id", "abc", "t"], 2),
    ("add-id-float", [*_ADD, "--board", "b9", "--id", "1.5", "t"], 2),
    ("add-id-2**53", [*_ADD, "--board", "b9", "--id", str(2**53), "t"], 2),
    *[(f"add-bad-board-{i}", [*_ADD, "--board", b, "t"], 2) for i, b in enumerate(BAD_BOARDS)],
    ("add-empty-title", [*_ADD, "--board", "b9", ""], 2),
    ("add-blank-title", [*_ADD, "--board", "b9", "   "], 2),
    ("add-title-too-long", [*_ADD, "--board", "b9", "t" * 1025], 2),
    ("add-prompt-too-big", [*_ADD, "--board", "b9", "--prompt", "p" * (MAX_TEXT + 1), "t"], 2),
    ("add-prompt-nul", [*_ADD, "--board", "b9", "--prompt", "a\x00b", "t"], 2),
    ("heartbeat-task-not-int", ["heartbeat", "abc", "{run}"], 2),
    ("heartbeat-task-0", ["heartbeat", "0", "{run}"], 2),
    ("heartbeat-task-not-found", ["heartbeat", "999", "{other}"], 2),
    ("heartbeat-run-not-uuid", ["heartbeat", "1", "not-a-uuid"], 2),
    ("heartbeat-run-uppercase", ["heartbeat", "1", "{RUN}"], 2),
    ("heartbeat-missing-run", ["heartbeat", "1"], 2),
    ("complete-follow-up-without-next-prompt", ["complete", "1", "{run}", "--follow-up"], 2),
    ("complete-follow-up-blank-next-prompt",
     ["complete", "1", "{run}", "--follow-up", "--next-prompt", " "], 2),
    ("complete-summary-too-big", ["complete", "1", "{run}", "--summary", "s" * (MAX_TEXT + 1)], 2),
    ("complete-task-not-found", ["complete", "999", "{other}"], 2),
    ("complete-run-not-uuid", ["complete", "1", "xyz"], 2),
    ("fail-missing-reason", ["fail", "1", "{run}"], 2),
    ("fail-empty-reason", ["fail", "1", "{run}", "--reason", ""], 2),
    ("fail-task-not-found", ["fail", "999", "{other}", "--reason", "x"], 2),
    ("rate-limited-retry-after-negative", ["rate-limited", "1", "{run}", "--retry-after", "-1"], 2),
    ("rate-limited-retry-after-zero", ["rate-limited", "1", "{run}", "--retry-after", "0"], 2),
    ("rate-limited-retry-after-nan", ["rate-limited", "1", "{run}", "--retry-after", "nan"], 2),
    ("rate-limited-retry-after-inf", ["rate-limited", "1", "{run}", "--retry-after", "inf"], 2),
    ("rate-limited-retry-after-huge", ["rate-limited", "1", "{run}", "--retry-after", "1e12"], 2),
    ("rate-limited-retry-after-abc", ["rate-limited", "1", "{run}", "--retry-after", "abc"], 2),
    ("rate-limited-task-not-found", ["rate-limited", "999", "{other}"], 2),
    ("show-task-not-int", ["show", "one"], 2),
    ("show-task-not-found", ["show", "999"], 2),
    ("cancel-task-not-found", ["cancel", "999"], 2),
    ("cancel-already-cancelled", ["cancel", "4"], 2),
    ("ls-bad-status", ["ls", "--status", "done"], 2),
    ("ls-bad-board", ["ls", "--board", "a b"], 2),
    ("pause-bad-board", ["pause", "a:b"], 2),
    ("resume-bad-board", ["resume", "*"], 2),
    ("cooldown-set-unknown-model", ["cooldown", "set", "gpt9", "60"], 2),
    ("cooldown-set-negative", ["cooldown", "set", "opus", "-5"], 2),
    ("cooldown-set-nan", ["cooldown", "set", "opus", "nan"], 2),
    ("cooldown-set-huge", ["cooldown", "set", "opus", "1e12"], 2),
    ("cooldown-set-abc", ["cooldown", "set", "opus", "abc"], 2),
    ("cooldown-clear-unknown-model", ["cooldown", "clear", "gpt9"], 2),
    ("cooldown-unknown-subcommand", ["cooldown", "frob"], 2),
    ("config-unknown-subcommand", ["config", "frob"], 2),
    ("config-load-missing-file", ["config", "load", "{tmp}/missing.yaml"], 2),
    ("config-load-directory", ["config", "load", "{tmp}"], 2),
    ("config-load-invalid-yaml", ["config", "load", "{tmp}/bad_yaml.yaml"], 2),
    ("config-load-invalid-value", ["config", "load", "{tmp}/bad_value.yaml"], 2),
    ("config-load-unknown-key", ["config", "load", "{tmp}/unknown_key.yaml"], 2),
    ("config-load-drops-chain-in-use", ["config", "load", "{tmp}/in_use.yaml"], 2),
    ("events-count-0", ["events", "--count", "0"], 2),
    ("bad-namespace", ["ls", "--namespace", "a b"], 2),
    ("bad-redis-url-scheme", ["ls", "--redis-url", "foo://x"], 2),
    # a run that is not the task's active run: fenced
    ("heartbeat-fenced", ["heartbeat", "1", "{other}"], 4),
    ("heartbeat-task-not-running", ["heartbeat", "2", "{run}"], 4),
    ("complete-fenced", ["complete", "1", "{other}", "--summary", "x"], 4),
    ("complete-in-review-task", ["complete", "3", "{run}"], 4),
    ("fail-fenced", ["fail", "1", "{other}", "--reason", "x"], 4),
    ("rate-limited-fenced", ["rate-limited", "1", "{other}", "--retry-after", "5"], 4),
]

CONFIG_FILES = {
    "bad_yaml.yaml": "queue: [\n",
    "bad_value.yaml": "limits:\n  model_max_inflight: {opus: -1}\n",
    "unknown_key.yaml": "queue:\n  global_max_concurrnt: 3\n",
    "in_use.yaml": "chains:\n  bulk: [gemini3_flash, glm]\n",
}


@pytest.fixture
def world(run: Run, tmp_path: Path) -> dict[str, str]:
    """A namespace with every kind of state: a running task, a queued one, in_review, cancelled, cooling.

    Task 1 (b1, coding) in progress as run ``run``; task 2 queued behind it; task 3 (b2, opus) in_review;
    task 4 cancelled; glm cooling down; board b5 paused.
    """
    add(run, "b1")
    add(run, "b1")
    add(run, "b2", "--model", "opus")
    add(run, "b3", "--chain", "bulk")
    ok(run, "cancel", "4")
    c = claim(run)
    assert c["task_id"] == 1
    c3 = claim(run)
    assert c3["task_id"] == 3
    ok(run, "complete", "3", c3["run_id"], "--summary", "done")
    ok(run, "cooldown", "set", "glm", "600")
    ok(run, "pause", "b5", "--create")
    for name, text in CONFIG_FILES.items():
        write(tmp_path / name, text)
    return {"run": c["run_id"], "RUN": c["run_id"].upper(), "other": new_uuid(), "tmp": str(tmp_path)}


def _fill(argv: list[str], values: dict[str, str]) -> list[str]:
    out = []
    for arg in argv:
        for name, value in values.items():
            arg = arg.replace("{" + name + "}", value)
        out.append(arg)
    return out


@pytest.mark.parametrize(("argv", "code"), [pytest.param(a, c, id=i) for i, a, c in BAD_INPUTS])
def test_bad_input_is_refused_cleanly(
    run: Run, r: redis.Redis, world: dict[str, str], argv: list[str], code: int
) -> None:
    args = _fill(argv, world)
    before = snapshot(r)
    got, out, err = run(*args)
    assert_one_line_error(got, code, out, err)
    assert out == ""
    assert snapshot(r) == before, "a refused command changed the keyspace"

    got, out, err = run("--json", *args)
    assert_one_line_error(got, code, out, err)
    assert out.count("\n") == 1
    assert json.loads(out) == {"error": err.removeprefix("clawq: ").rstrip("\n"), "exit_code": code}
    assert snapshot(r) == before, "a refused command changed the keyspace"


@pytest.mark.parametrize("argv", [
    pytest.param([*_ADD, "--board", "b9\n", "t"], id="board"),
    pytest.param(["pause", "b9\n"], id="pause"),
    pytest.param(["ls", "--namespace", "ns\n"], id="namespace"),
])
def test_names_with_a_trailing_newline_are_refused(run: Run, r: redis.Redis, argv: list[str]) -> None:
    add(run, "b1")
    before = snapshot(r)
    code, out, err = run(*argv)
    assert_one_line_error(code, 2, out, err)
    assert snapshot(r) == before


@pytest.mark.parametrize("argv", [
    pytest.param([*_ADD, "--board", "a b", "t"], id="bad-board"),
    pytest.param([*_ADD, "--board", "b1", ""], id="empty-title"),
    pytest.param(["add", "--board", "b1", "--chain", "nochain", "t"], id="unknown-chain"),
    pytest.param(["heartbeat", "1", "not-a-uuid"], id="bad-run-id"),
    pytest.param(["show", "1"], id="task-not-found"),
    pytest.param(["cooldown", "set", "gpt9", "5"], id="unknown-model"),
])
def test_bad_input_on_a_fresh_namespace_writes_nothing(run: Run, r: redis.Redis, argv: list[str]) -> None:
    code, out, err = run(*argv)
    assert_one_line_error(code, 2, out, err)
    assert snapshot(r) == {}, "a refused command wrote to a namespace that did not exist"


@pytest.mark.parametrize("argv", [
    ["ls"], ["claim"], ["health"], ["show", "1"], ["config", "show"], ["events"], ["reap"],
    ["cooldown", "ls"], ["add", "--board", "b1", "--chain", "coding", "t"], ["pause", "b1"],
    ["heartbeat", "1", "00000000-0000-4000-8000-000000000000"],
], ids=lambda a: "-".join(a[:2]))
def test_redis_unreachable_exits_1_with_one_line(run: Run, argv: list[str]) -> None:
    code, out, err = run(*argv, url=UNREACHABLE)
    assert_one_line_error(code, 1, out, err)
    assert "127.0.0.1:1" in err
    code, out, err = run("--json", *argv, url=UNREACHABLE)
    assert_one_line_error(code, 1, out, err)
    assert json.loads(out)["exit_code"] == 1


def test_redis_password_is_not_printed(run: Run) -> None:
    code, out, err = run("--json", "ls", url="redis://user:s3cret@127.0.0.1:1/0")
    assert_one_line_error(code, 1, out, err)
    assert "s3cret" not in err and "s3cret" not in out


# -- the real process ----------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLAWQ_")}
    env["CLAWQ_REDIS_URL"] = UNREACHABLE
    env["PYTHONUNBUFFERED"] = "1"
    return env


def clawq(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clawq.cli", *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
        timeout=60, check=False,
    )


def test_process_exit_codes_and_no_traceback(redis_url: str, r: redis.Redis, namespace: str) -> None:
    base = ["--redis-url", redis_url, "--namespace", namespace]
    done = clawq(*base, "add", "--board", "b1", "--chain", "coding", "t", "--json")
    assert (done.returncode, done.stderr) == (0, "")
    assert json.loads(done.stdout) == {"task_id": 1, "board": "b1", "status": "up_next"}
    cases = [
        (["ls"], UNREACHABLE, 1),
        (["add", "--board", "a b", "--chain", "coding", "t"], redis_url, 2),
        (["heartbeat", "x", "y"], redis_url, 2),
        (["frobnicate"], redis_url, 2),
        (["claim", "--json"], redis_url, 0),
        (["claim"], redis_url, 3),
    ]
    for argv, url, code in cases:
        done = clawq("--redis-url", url, "--namespace", namespace, *argv)
        assert done.returncode == code, (argv, done.stderr)
        assert "Traceback" not in done.stderr + done.stdout
        if code:
            assert done.stderr.startswith("clawq: ") and done.stderr.count("\n") == 1, done.stderr


@pytest.fixture
def follower(redis_url: str, namespace: str) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "clawq.cli", "--redis-url", redis_url, "--namespace", namespace,
         "events", "--follow", "--json"],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def _wait_for_xread(r: redis.Redis, deadline: float) -> None:
    while time.monotonic() < deadline:
        if any(c.get("cmd") == "xread" for c in r.client_list()):
            return
        time.sleep(0.05)
    pytest.fail("clawq events --follow never blocked on XREAD")


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            proc.kill()
            pytest.fail(f"clawq events --follow printed nothing: {proc.communicate(timeout=10)}")
    return proc.stdout.readline()


def _interrupt(proc: subprocess.Popen[str]) -> str:
    """Ctrl-C is the normal way to stop following: exit 0, nothing on stderr."""
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, (proc.returncode, err)
    assert "Traceback" not in err
    return err


def test_process_events_follow(run: Run, r: redis.Redis, follower: subprocess.Popen[str]) -> None:
    _wait_for_xread(r, time.monotonic() + 20)
    add(run, "b1")
    event = json.loads(_read_line(follower, 20))
    if event["type"] == "config_loaded":  # the namespace's first change stores the seed config
        assert follower.stdout is not None  # the next line may already sit in the reader's buffer
        event = json.loads(follower.stdout.readline())
    assert (event["type"], event["task_id"], event["board"]) == ("added", 1, "b1")
    assert _interrupt(follower) == ""


def test_process_interrupt_stops_following_quietly(r: redis.Redis, follower: subprocess.Popen[str]) -> None:
    _wait_for_xread(r, time.monotonic() + 20)
    assert _interrupt(follower) == ""
