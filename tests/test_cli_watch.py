"""`clawq top` and the filters of `clawq events`."""

from __future__ import annotations

import json

import pytest

from clawq import cli
from clawq.broker import Broker


def run(capsys: pytest.CaptureFixture[str], url: str, ns: str, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.main(["--redis-url", url, "--namespace", ns, *args])
    out, _ = capsys.readouterr()
    return int(exc.value.code or 0), out


def test_top_once_shows_boards_models_and_why(capsys: pytest.CaptureFixture[str], redis_url: str,
                                               broker: Broker) -> None:
    broker.add("web", "one", chain="coding")
    broker.add("web", "two", chain="coding")
    c = broker.claim()
    broker.fail(c.task_id, c.run_id, "request timed out")
    code, out = run(capsys, redis_url, broker.namespace, "top", "--once")
    assert code == 0
    assert "web" in out and "backoff" in out  # the board and why it waits
    assert "codex" in out and "timeout" in out  # a model row and the recent error's root cause


def test_events_filter_by_reason_and_board(capsys: pytest.CaptureFixture[str], redis_url: str,
                                            broker: Broker) -> None:
    broker.add("web", "one", chain="coding")
    broker.add("api", "two", chain="coding")
    first, second = broker.claim(), broker.claim()
    broker.fail(first.task_id, first.run_id, "agent timed out")
    broker.rate_limited(second.task_id, second.run_id, retry_after=30)
    code, out = run(capsys, redis_url, broker.namespace, "events", "--reason", "timeout", "--json")
    rows = json.loads(out)
    assert code == 0 and [r["type"] for r in rows] == ["timeout"] and rows[0]["task_id"] == first.task_id
    code, out = run(capsys, redis_url, broker.namespace, "events", "--board", second.board, "--json")
    assert {r["board"] for r in json.loads(out)} == {second.board}
    assert [r["type"] for r in json.loads(out)] == ["added", "claimed", "rate_limit"]
