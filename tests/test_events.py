"""Event types: one enum (broker/events.py), one catalogue (lua/README.md), and the scripts emit nothing else."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from clawq.broker import Broker, InputError, Outcome
from clawq.broker.events import COOLING_TYPES, FAILURE_TYPES, EventType
from clawq.broker.scripts import load_specs
from clawq.broker.signals import SignalClass

LUA_README = Path(__file__).resolve().parent.parent / "lua" / "README.md"
#: emit(K, now, <type>, ...) and the one raw XADD (load_config): the type argument as written.
EMIT = re.compile(r'emit\(K, now, ([^{]+?), \{')
XADD_TYPE = re.compile(r'"XADD".*?"type", ("[a-z_]+")')
LITERAL = re.compile(r'"([a-z_]+)"')
#: Emits whose type comes from the caller, by the variable the script passes, and the family it belongs to.
FROM_CALLER = {"cause": FAILURE_TYPES, "reason": COOLING_TYPES, "etype": frozenset(EventType)}


def _emitted() -> tuple[set[str], set[str]]:
    """(the literal types the scripts emit, the names of variables they emit as a type)."""
    literals, variables = set(), set()
    for spec in load_specs().values():
        for arg in EMIT.findall(spec.source) + XADD_TYPE.findall(spec.source):
            found = LITERAL.findall(arg)
            if found:
                literals.update(found)
            else:
                variables.add(arg.strip())
    return literals, variables


def test_the_scripts_emit_only_catalogued_types() -> None:
    literals, variables = _emitted()
    assert literals, "no emit found: the pattern no longer matches the scripts"
    assert literals - set(EventType) == set()
    assert variables <= set(FROM_CALLER), f"a script emits a type from {variables - set(FROM_CALLER)}"


def test_every_type_is_emitted_somewhere() -> None:
    literals, _ = _emitted()
    assert set(EventType) - literals - FAILURE_TYPES - COOLING_TYPES == set()


def test_the_lua_readme_catalogue_lists_exactly_the_enum() -> None:
    section = LUA_README.read_text(encoding="utf-8").split("## Events", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    listed = {t for row in rows for t in re.findall(r"`([a-z_]+)`", row)}
    assert listed == set(EventType)


def test_every_root_cause_of_a_signal_is_a_failure_type() -> None:
    assert {k.root_cause for k in SignalClass} <= FAILURE_TYPES


def test_a_failure_cause_outside_the_catalogue_is_refused_and_changes_nothing(broker: Broker) -> None:
    tid = broker.add("web", "t", chain="coding")
    claim = broker.claim()
    before = broker.get_task(tid)
    with pytest.raises(InputError, match="bad failure cause 'exploded'"):
        broker.fail(tid, claim.run_id, "boom", cause="exploded")
    with pytest.raises(InputError, match="bad cooling cause 'sleepy'"):
        broker.rate_limited(tid, claim.run_id, retry_after=5, cause="sleepy")
    assert broker.get_task(tid) == before


def test_the_events_a_run_makes_are_enum_members(broker: Broker) -> None:
    tid = broker.add("web", "t", chain="coding")
    broker.fail(tid, broker.claim().run_id, "the request timed out")
    broker.pause("web")
    types = [e["type"] for e in broker.events(100)]
    assert types == ["config_loaded", "added", "claimed", "timeout", "paused"]
    assert all(EventType(t) for t in types)


def test_an_added_event_says_when_its_task_waits_behind_its_board(broker: Broker) -> None:
    """``waits: board`` exactly when the new task cannot start before its board changes: a lower id queued
    ahead of it, a run in progress, or a pause. A new head of a free board, and a task due later, leave it out."""
    broker.add("web", "head", chain="coding", task_id=10)
    broker.add("web", "behind a lower id", chain="coding", task_id=11)
    broker.add("web", "a lower id: the new head", chain="coding", task_id=5)
    run = broker.claim()
    broker.add("web", "lower than the run, behind it", chain="coding", task_id=3)
    broker.pause("api")
    broker.add("api", "head of a paused board", chain="coding")
    broker.add("ops", "due later", chain="coding", not_before=broker.now() + 3600)
    waits = {e["task_id"]: e.get("waits") for e in broker.events(100) if e["type"] == "added"}
    assert run.task_id == 5
    assert waits == {10: None, 11: "board", 5: None, 3: "board", 12: "board", 13: None}


def test_a_completed_event_says_when_no_board_is_ready(broker: Broker) -> None:
    """``idle: 1`` exactly when the completion leaves its board with nothing ready and no board anywhere is
    ready: the dispatcher needs no pass for it."""
    a = broker.add("web", "a", chain="coding")
    b = broker.add("api", "b", chain="coding")
    runs = {c.task_id: c.run_id for c in (broker.claim(), broker.claim())}
    broker.add("api", "c", chain="coding")  # behind b
    broker.complete(a, runs[a], Outcome(summary="a"))  # web idle, api busy with b: nothing ready
    broker.complete(b, runs[b], Outcome(summary="b"))  # api's c is ready now
    c = broker.claim()
    broker.complete(c.task_id, c.run_id, Outcome(summary="c"))  # nothing anywhere
    idle = [e.get("idle") for e in broker.events(100) if e["type"] == "completed"]
    assert idle == ["1", None, "1"]
