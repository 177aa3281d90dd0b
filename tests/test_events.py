"""Event types: one enum (broker/events.py), one catalogue (lua/README.md), and the scripts emit nothing else."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from clawq.broker import Broker, InputError
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
