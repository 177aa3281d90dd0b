"""Where a script's server time goes: its inner Redis commands (INFO commandstats) and truncated copies of it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import redis

from clawq.broker.scripts import load_specs

from ._common import cmdstats, reset_stats

__all__ = ["breakdown", "inner_calls", "measure", "truncated_variants"]

#: Commands that are the harness, not the script: never part of a breakdown.
_HARNESS = frozenset({"info", "config|resetstat", "hello", "client|setinfo", "script|load", "ping"})


def measure(client: redis.Redis, calls: Callable[[], int]) -> tuple[float, dict[str, tuple[int, int]]]:
    """Reset the stats, run ``calls`` (returns how many script calls it made); EVALSHA µs per call and all stats."""
    reset_stats(client)
    n = calls()
    stats = cmdstats(client)
    evals, usec = stats.get("evalsha", (0, 0))
    if n and evals != n:
        raise RuntimeError(f"expected {n} EVALSHA calls, INFO commandstats counted {evals}")
    return (usec / evals if evals else float("nan")), stats


def breakdown(samples: Sequence[dict[str, tuple[int, int]]], ops: int) -> list[dict[str, Any]]:
    """Inner commands of ``ops`` script calls summed over ``samples``: calls and µs per script call, costliest first.

    The row ``(lua + call overhead)`` is EVALSHA's time minus its inner commands' time: interpreting the script,
    building arguments and replies, cjson.
    """
    total: dict[str, list[int]] = {}
    for stats in samples:
        for cmd, (calls, usec) in stats.items():
            acc = total.setdefault(cmd, [0, 0])
            acc[0] += calls
            acc[1] += usec
    evalsha = total.pop("evalsha", [0, 0])
    inner = {c: v for c, v in total.items() if c not in _HARNESS}
    n = max(1, ops)
    rows: list[dict[str, Any]] = [
        {"command": c, "calls_per_op": v[0] / n, "usec_per_op": v[1] / n} for c, v in inner.items()
    ]
    rows.sort(key=lambda r: -float(r["usec_per_op"]))
    inner_usec = sum(v[1] for v in inner.values())
    rows.append({"command": "(lua + call overhead)", "calls_per_op": 0.0,
                 "usec_per_op": (evalsha[1] - inner_usec) / n})
    rows.append({"command": "TOTAL (evalsha)", "calls_per_op": sum(v[0] for v in inner.values()) / n,
                 "usec_per_op": evalsha[1] / n})
    return rows


def inner_calls(stats: dict[str, tuple[int, int]], ops: int) -> float:
    """Redis commands the scripts ran per script call (EVALSHA and the harness left out)."""
    return sum(c for cmd, (c, _) in stats.items() if cmd != "evalsha" and cmd not in _HARNESS) / max(1, ops)


def truncated_variants(script: str, anchors: Sequence[tuple[str, str]]) -> dict[str, str]:
    """Copies of ``script`` that return ``{99}`` just before each anchor line (label -> source).

    An anchor the script no longer has is left out (the scripts may change under the benchmark).
    """
    source = load_specs()[script].source
    out: dict[str, str] = {}
    for label, anchor in anchors:
        at = source.find(anchor)
        if at >= 0:
            out[label] = source[:at] + "do return {99} end\n" + source[at:]
    return out


_RECORDER = """local CALLS = {}
local rcall = function(...)
  CALLS[#CALLS + 1] = {...}
  return redis.call(...)
end"""


def recording_copy(script: str) -> str:
    """A copy of ``script`` whose redis.call()s are recorded and whose success return gives the record instead.

    "" when the script no longer has the lines this relies on (``local rcall = redis.call``, a final
    ``return`` at the start of a line: the success path's).
    """
    source = load_specs()[script].source
    head = "local rcall = redis.call"
    last = source.rfind("\nreturn ")
    if head not in source or last < 0:
        return ""
    end = source.find("\n", last + 1)
    tail = source[end:] if end >= 0 else ""
    return source[:last].replace(head, _RECORDER, 1) + "\nreturn CALLS" + tail


def _lua_literal(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raw = str(value).encode("utf-8")
    return '"' + "".join(chr(b) if 32 <= b < 127 and b not in (34, 92) else f"\\{b:03d}" for b in raw) + '"'


def replay_source(calls: list[list[Any]]) -> str:
    """A script that makes exactly ``calls`` (literal arguments) and nothing else: the cost of the calls alone."""
    lines = ["local c = redis.call"]
    lines += ["c(" + ", ".join(_lua_literal(a) for a in call) + ")" for call in calls]
    return "\n".join([*lines, "return 1", ""])
