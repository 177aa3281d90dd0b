"""broker/keys.py names every key, and the README's keyspace table lists exactly those keys."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from clawq.broker.keys import Keys

README = Path(__file__).resolve().parent.parent / "README.md"
#: How the README spells each key builder's argument.
PLACEHOLDERS = {"board": "<b>", "task_id": "<id>", "schedule_id": "<id>", "model": "<model>",
                "provider": "<provider>", "event_id": "<event id>", "ck": "<ck>", "kind": "<kind>",
                "identity": "<namespace id>"}


def _built_keys() -> set[str]:
    """Every key Keys builds, without the namespace prefix, with the README's placeholders."""
    keys = Keys("default")
    out = set()
    for name, member in inspect.getmembers(Keys):
        if name.startswith("_") or name == "prefix":
            continue
        if isinstance(member, property):
            value = getattr(keys, name)
        elif inspect.isfunction(member):
            params = [p for p in inspect.signature(member).parameters if p != "self"]
            value = getattr(keys, name)(*(PLACEHOLDERS[p] for p in params))
        else:
            continue
        assert value.startswith(keys.prefix), name
        out.add(value[len(keys.prefix):])
    return out


def _readme_keys() -> set[str]:
    section = README.read_text(encoding="utf-8").split("## Keyspace", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `P ")]
    return {m for row in rows for m in re.findall(r"`P ([^`]+)`", row)}


def test_the_readme_lists_every_key_that_exists() -> None:
    missing = _built_keys() - _readme_keys()
    assert missing == set(), f"keys built by broker/keys.py but missing from README's keyspace table: {missing}"


def test_the_readme_lists_no_key_that_does_not_exist() -> None:
    extra = _readme_keys() - _built_keys()
    assert extra == set(), f"keys in README's keyspace table that broker/keys.py never builds: {extra}"
