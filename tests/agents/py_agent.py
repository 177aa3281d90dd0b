"""Callables for the python runner (``agent.callable = "agents.py_agent:<name>"``)."""

from __future__ import annotations

import threading
import time
from typing import Any

from clawq.broker import Outcome

#: set by the tests to let a blocked callable return (so no thread outlives its test for long)
RELEASE = threading.Event()
CALLS: list[dict[str, Any]] = []


def done(task: dict[str, Any]) -> dict[str, Any]:
    CALLS.append(task)
    return {"status": "done", "needs_follow_up": False, "summary": f"did {task['title']}"}


def follow_up(task: dict[str, Any]) -> dict[str, Any]:
    return {"status": "done", "needs_follow_up": True, "next_prompt": "go on", "summary": "half"}


def outcome(task: dict[str, Any]) -> Outcome:
    return Outcome(needs_follow_up=False, summary="an Outcome object")


def clawtrol(task: dict[str, Any]) -> dict[str, Any]:
    return {"version": "1", "task_id": task["task_id"], "run_id": task["run_id"], "needs_follow_up": True,
            "recommended_action": "requeue_same_task", "next_prompt": "again", "summary": "v1"}


def rate_limited(task: dict[str, Any]) -> dict[str, Any]:
    return {"status": "rate_limited", "retry_after_seconds": 30, "message": "slow down"}


def raises_429(task: dict[str, Any]) -> dict[str, Any]:
    raise RuntimeError("429 Too Many Requests. Please try again in 7s")


def raises(task: dict[str, Any]) -> dict[str, Any]:
    raise ValueError("the tests did not pass")


def returns_int(task: dict[str, Any]) -> int:
    return 42


def returns_bad_doc(task: dict[str, Any]) -> dict[str, Any]:
    return {"status": "done", "summary": ["not", "a", "string"]}


def returns_huge_retry(task: dict[str, Any]) -> dict[str, Any]:
    return {"status": "rate_limited", "retry_after_seconds": 10**400}


def blocks(task: dict[str, Any]) -> dict[str, Any]:
    RELEASE.wait(30)
    return {"status": "done", "summary": "released"}


not_callable = 5


def slow_done(task: dict[str, Any]) -> dict[str, Any]:
    """Done after 0.2 s: longer than a runner's first poll."""
    time.sleep(0.2)
    return done(task)


#: What :func:`returns` gives back (a test sets it).
RETURNS: Any = None


def returns(task: dict[str, Any]) -> Any:
    return RETURNS


#: Called by :func:`then_done` before it answers (a test sets it, e.g. to pause Redis).
BEFORE: Any = None


def then_done(task: dict[str, Any]) -> dict[str, Any]:
    if BEFORE is not None:
        BEFORE()
    return {"status": "done", "needs_follow_up": False, "summary": f"did {task['title']}"}


#: What :func:`records` saw of its process: the thread it ran on and the threads alive.
SEEN: dict[str, Any] = {}


def records(task: dict[str, Any]) -> dict[str, Any]:
    SEEN.update(thread=threading.current_thread().name, idents=[t.ident for t in threading.enumerate()])
    return done(task)


def stubborn(task: dict[str, Any]) -> dict[str, Any]:
    """Swallows whatever is raised into it, three times, and then says it is done."""
    for _ in range(3):
        try:
            time.sleep(10)
        except BaseException:  # the point of this agent
            SEEN["swallowed"] = SEEN.get("swallowed", 0) + 1
    return done(task)
