"""The tools answer honestly: `events -n N` filters before it counts, text `health` says why each board
waits and shows the providers, and `pause`/`resume` of an unknown board needs --create."""

from __future__ import annotations

import json

import pytest
import redis
from helpers import run_cli

from clawq.broker import Broker
from clawq.broker.config import Config


@pytest.fixture
def base(redis_url: str, r: redis.Redis, namespace: str) -> list[str]:
    return ["--redis-url", redis_url, "--namespace", namespace]


def test_events_n_means_the_last_n_matching_events(broker: Broker, base: list[str],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    broker.load_config(Config.model_validate({"night_mode": None}))
    old = broker.add("rare", "the old one", chain="coding")
    c = broker.claim()
    broker.fail(c.task_id, c.run_id, "Request timed out after 600s")  # a timeout, long ago
    for i in range(60):
        broker.add("busy", f"t{i}", chain="coding")
    code, out, _ = run_cli(["events", "--board", "rare", "-n", "2", "--json", *base], capsys)
    rows = json.loads(out)
    assert code == 0 and [r["board"] for r in rows] == ["rare", "rare"] and rows[-1]["task_id"] == old
    assert [r["type"] for r in rows] == ["claimed", "timeout"] or rows[-1]["type"] in ("failed", "timeout")
    code, out, _ = run_cli(["events", "--reason", "timeout", "-n", "5", "--json", *base], capsys)
    assert code == 0 and len(json.loads(out)) == 1
    code, out, _ = run_cli(["events", "--board", "busy", "-n", "3", *base], capsys)
    assert code == 0 and len(out.splitlines()) == 3 and "t59" not in out  # the newest three, text form
    code, out, _ = run_cli(["events", "--board", "nowhere", "-n", "3", "--json", *base], capsys)
    assert code == 0 and json.loads(out) == []


def test_text_health_says_why_each_board_waits_and_shows_providers(broker: Broker, base: list[str],
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    broker.load_config(Config.model_validate({"night_mode": None, "queue": {"global_max_concurrent": 1}}))
    broker.add("running", "a", chain="coding")
    broker.add("capped", "b", chain="bulk")
    broker.claim()
    code, out, _ = run_cli(["health", *base], capsys)
    assert code == 0
    lines = {ln.split()[1]: ln for ln in out.splitlines() if ln.strip().startswith("board ")}
    assert lines["running"].rstrip().endswith("running"), out  # the state would say idle
    assert lines["capped"].rstrip().endswith("global_cap"), out  # the state would say ready
    assert any(ln.strip().startswith("provider openai") and " 1/" in ln for ln in out.splitlines()), out


@pytest.mark.parametrize("verb", ["pause", "resume"])
def test_pause_or_resume_of_an_unknown_board_needs_create(verb: str, broker: Broker, r: redis.Redis,
                                                          base: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    broker.add("web", "a", chain="coding")
    before = sorted(r.smembers(broker.keys.boards))
    code, out, err = run_cli([verb, "wbe", *base], capsys)
    assert code == 2 and out == "" and len(err.splitlines()) == 1 and "unknown board 'wbe'" in err, err
    assert "--create" in err
    assert sorted(r.smembers(broker.keys.boards)) == before and not r.exists(broker.keys.board("wbe"))
    assert run_cli([verb, "web", *base], capsys)[0] == 0
    code, out, _ = run_cli([verb, "ops", "--create", "--json", *base], capsys)
    assert code == 0 and json.loads(out)["board"] == "ops"
    assert run_cli(["resume", "ops", *base], capsys)[0] == 0  # known from now on
