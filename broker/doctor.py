"""``clawq doctor``: turn the reply of ``lua/doctor-24.lua`` into a report.

The script checks every invariant of a namespace (see its header) and, in repair mode, rebuilds the
derived state -- counters, the model blocks, board running slots, indexes, refs, ``ready:fronts``,
``seq:task``, ``cfg:claim`` -- from the source of truth (task hashes, board queues, ``running``, the
``cfg:*`` hashes), atomically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["DoctorReply", "doctor_report", "parse_reply"]


@dataclass(frozen=True)
class DoctorReply:
    """One run of the script: the problems it found and, in repair mode, what it changed."""

    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)


def parse_reply(reply: list[Any]) -> DoctorReply:
    """``{0, n, problem_1 .. problem_n, repaired_1 ..}`` -> :class:`DoctorReply`."""
    if len(reply) < 2 or int(reply[0]) != 0:
        raise ValueError(f"unexpected doctor reply {reply!r}")
    n = int(reply[1])
    items = [str(x) for x in reply[2:]]
    return DoctorReply(problems=items[:n], repaired=items[n:])


def doctor_report(found: DoctorReply, remaining: list[str]) -> dict[str, Any]:
    """``{"ok", "problems", "repaired", "remaining"}``: ok when no problem remains."""
    return {
        "ok": not remaining,
        "problems": list(found.problems),
        "repaired": list(found.repaired),
        "remaining": list(remaining),
    }
