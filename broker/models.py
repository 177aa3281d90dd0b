"""Typed values the broker API takes and returns."""

from __future__ import annotations

import enum
import hashlib
import json
from functools import cached_property
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator

from .checks import MAX_TEXT_BYTES, text_problem

__all__ = ["MAX_TEXT_BYTES", "Added", "Claim", "Completion", "Deadlines", "Outcome", "Task", "TaskStatus"]

class TaskStatus(enum.StrEnum):
    """Where a task is; it is always in exactly one of these places."""

    SCHEDULED = "scheduled"  #: waiting for its not-before time or the night window (in no board queue)
    UP_NEXT = "up_next"  #: in its board's queue (maybe its head in failure backoff)
    IN_PROGRESS = "in_progress"  #: a run holds its lease
    IN_REVIEW = "in_review"  #: the last run said no follow-up is needed
    FAILED = "failed"  #: max_attempts failures or timeouts in a row
    CANCELLED = "cancelled"  #: an operator cancelled it

    @property
    def final(self) -> bool:
        return self in (TaskStatus.IN_REVIEW, TaskStatus.FAILED, TaskStatus.CANCELLED)


class Deadlines(BaseModel):
    """What becomes due next, read in one round trip (epoch seconds; None: nothing of that kind)."""

    model_config = ConfigDict(frozen=True)

    lease: float | None  #: the earliest lease deadline (the reaper has nothing to do before it)
    backoff: float | None  #: the earliest end of a failure backoff
    cooldown: float | None  #: the earliest end of a model cooldown or of a provider breaker's opening
    summary_lock_s: float | None  #: how long the periodic summary's lock still holds, None when it is free
    scheduled: float | None = None  #: when the earliest scheduled task becomes due
    schedule: float | None = None  #: when the earliest recurring schedule fires next

    @property
    def next(self) -> float | None:
        """The nearest lease deadline, backoff end, cooldown end, scheduled task's due time or schedule firing."""
        times = [t for t in (self.lease, self.backoff, self.cooldown, self.scheduled, self.schedule) if t is not None]
        return min(times) if times else None


class Added(BaseModel):
    """What ``add`` did: the new task's id, its status (up_next, or scheduled) and when it becomes due."""

    model_config = ConfigDict(frozen=True)

    task_id: int
    status: TaskStatus
    due_at: float | None = None  #: epoch seconds, while scheduled


class Claim(BaseModel):
    """A successful claim: run ``task_id`` on ``model`` as run ``run_id``."""

    model_config = ConfigDict(frozen=True)

    task_id: int
    board: str
    model: str
    provider: str
    run_id: str
    run_count: int  #: completed runs + 1: the number this run gets if it records an outcome
    attempt: int  #: failures and timeouts since the last outcome + 1
    lease_deadline: float  #: epoch seconds


def _check_size(name: str, value: str | None) -> None:
    problem = None if value is None else text_problem(name, value, MAX_TEXT_BYTES)
    if problem is not None:
        raise ValueError(problem)


class Outcome(BaseModel):
    """The mandatory outcome of a run (ClawTrol outcome payload v1 fields)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    needs_follow_up: StrictBool = False  #: `"yes"` or `1` is not an answer
    next_prompt: str | None = None
    summary: str = ""
    achieved: list[str] | str | None = None
    evidence: list[str] | str | None = None
    remaining: list[str] | str | None = None
    model_used: str | None = None

    @model_validator(mode="after")
    def _follow_up_needs_prompt(self) -> Outcome:
        if self.needs_follow_up and not (self.next_prompt or "").strip():
            raise ValueError("next_prompt is required when needs_follow_up is true")
        _check_size("next_prompt", self.next_prompt)
        _check_size("summary", self.summary)
        return self

    def extras(self) -> dict[str, Any]:
        """The optional fields that were given, for the task's context entry. An empty list is left out: the
        script's cjson cannot tell an empty array from an empty object and would store it as ``{}``."""
        fields = ("achieved", "evidence", "remaining", "model_used")
        return {k: getattr(self, k) for k in fields if getattr(self, k) not in (None, [])}

    def digest(self) -> str:
        """A stable fingerprint: a repeat of the same outcome is recognised by it. 96 bits of SHA-256, so the task
        field that keeps it (``last_digest`` = "<run id>|<digest>", 61 bytes) stays within Redis's 64-byte
        listpack value limit and a finished task's hash keeps its compact encoding."""
        return self._digest

    @cached_property
    def _digest(self) -> str:  # an Outcome is frozen: computed once (a batch may complete many with one)
        doc = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(doc.encode("utf-8")).hexdigest()[:24]


class Completion(BaseModel):
    """What ``complete`` did."""

    task_id: int
    status: TaskStatus
    run_count: int
    repeated: bool = False  #: the same outcome had already been recorded: nothing changed
    note: str = ""


class Task(BaseModel):
    """A task as stored, with its context and run history."""

    task_id: int
    board: str
    title: str
    prompt: str = ""
    chain: str | None = None
    model: str | None = None  #: the pinned model, when the task has no chain
    status: TaskStatus
    run_count: int = 0
    attempts: int = 0
    run_id: str | None = None  #: the active run while in progress
    running_model: str | None = None  #: the model of the active or last run
    running_provider: str | None = None
    lease_deadline: float | None = None
    backoff_until: float | None = None
    last_error: str | None = None
    last_error_reason: str | None = None
    created_at: float
    updated_at: float
    not_before: float | None = None  #: the time it was asked to wait for (epoch s)
    night_only: bool = False  #: it may only start inside the night window
    due_at: float | None = None  #: while scheduled: when it joins its board queue (epoch s)
    schedule: int | None = None  #: the recurring schedule whose firing added it
    context: list[dict[str, Any]] = Field(default_factory=list)
    runs: list[dict[str, Any]] = Field(default_factory=list)
