"""ClawTrol's face of the HTTP API: its task JSON, its queue snapshot, and the bodies of its agent routes.

An OpenClaw agent that follows ClawTrol's skill reads a task as ``id``, ``name``, ``description``,
``status``, ``model`` and ``board``; it never sends a run id. The routes that act for it (claim, unclaim,
report_rate_limit, agent_complete) act on the task's active run, found here.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from clawq.broker import Broker, ClawqError, Outcome, Task, TaskStatus
from clawq.workers.clawtrol import rails_bool

__all__ = [
    "AgentCompleteIn",
    "ClaimIn",
    "ClawtrolTask",
    "ModelLimit",
    "NoActiveRun",
    "ProgressIn",
    "RateLimitIn",
    "RateLimitOut",
    "active_task",
    "describe",
    "iso",
    "queue_snapshot",
    "render",
    "resets_in",
]

#: Names under which ClawTrol's agent_complete finds the output text and the files, first present wins.
OUTPUT_NAMES = ("output", "description", "summary", "result", "text", "message", "content")
FILE_NAMES = ("files", "output_files", "created_files", "changed_files", "modified_files")


class NoActiveRun(ClawqError):
    """The task has no run in progress, so a route that acts on its active run has nothing to act on."""

    def __init__(self, task: Task) -> None:
        super().__init__(f"task {task.task_id} has no active run (it is {task.status.value}): "
                         "take work with GET /api/v1/tasks/next")


def iso(ts: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC with milliseconds, as ClawTrol writes times."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _items(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def _entry_text(entry: dict[str, Any]) -> str:
    lines = [f"## Run {entry.get('run_count', '?')} ({entry.get('model', '?')})"]
    if entry.get("summary"):
        lines.append(str(entry["summary"]))
    for key in ("achieved", "evidence", "remaining"):
        items = _items(entry.get(key))
        if items:
            lines.append(f"{key.capitalize()}:\n" + "\n".join(f"- {item}" for item in items))
    if entry.get("next_prompt"):
        lines.append(f"Next: {entry['next_prompt']}")
    return "\n\n".join(lines)


def describe(task: Task) -> str:
    """The task's prompt followed by its accumulated context (one section per recorded run, oldest first)."""
    parts = [task.prompt.strip()] if task.prompt.strip() else []
    parts += [_entry_text(entry) for entry in task.context]
    return "\n\n".join(parts)


class ClawtrolTask(BaseModel):
    """A task as ClawTrol renders it (``id``, ``name``, ``description`` …), with clawq's run fields beside."""

    id: int = Field(description="The task id.")
    name: str = Field(description="The title.")
    description: str = Field(description="The prompt, then the context of every recorded run.")
    status: TaskStatus
    model: str | None = Field(description="The active run's model, else the pinned model (None for a chain).")
    board: str
    chain: str | None
    retry_count: int = Field(description="Failures and timeouts since the last outcome.")
    error_message: str | None
    created_at: str | None
    updated_at: str | None
    task_id: int
    run_id: str | None = Field(description="The active run (None when nothing runs).")
    run_count: int
    lease_deadline: float | None


def render(task: Task) -> ClawtrolTask:
    active = task.status is TaskStatus.IN_PROGRESS
    return ClawtrolTask(
        id=task.task_id, name=task.title, description=describe(task), status=task.status,
        model=task.running_model if active else task.model, board=task.board, chain=task.chain,
        retry_count=task.attempts, error_message=task.last_error, created_at=iso(task.created_at),
        updated_at=iso(task.updated_at), task_id=task.task_id, run_id=task.run_id if active else None,
        run_count=task.run_count, lease_deadline=task.lease_deadline if active else None,
    )


def active_task(broker: Broker, task_id: int) -> tuple[Task, str]:
    """The task and its active run id; raises TaskNotFound, or :class:`NoActiveRun`."""
    task = broker.get_task(task_id)
    if task.status is not TaskStatus.IN_PROGRESS or not task.run_id:
        raise NoActiveRun(task)
    return task, task.run_id


def queue_snapshot(health: dict[str, Any], now: float) -> dict[str, Any]:
    """ClawTrol's queue_health keys, read from clawq's health document (added beside its own keys)."""
    glob, boards, models = health["global"], health["boards"], health["models"]
    cap, running = int(glob["max_concurrent"]), int(glob["in_progress"])
    return {
        "now": iso(now),
        "in_night_window": bool(glob["night"]),
        "max_concurrent": cap,
        "active_in_progress": running,
        "available_slots": max(0, cap - running),
        "queue_depth": sum(int(b["queue_depth"]) for b in boards.values()),
        "queue_depth_by_board": {name: int(b["queue_depth"]) for name, b in boards.items() if b["queue_depth"]},
        "inflight_by_model": {m: int(d["inflight"]) for m, d in models.items() if d["inflight"]},
        "inflight_by_provider": {p: int(d["inflight"]) for p, d in health["providers"].items() if d["inflight"]},
        "model_limits_active": [m for m, d in models.items() if d["cooldown_remaining_s"] > 0],
    }


# -- request bodies ----------------------------------------------------------------------------------------
Flag = Annotated[bool | None, BeforeValidator(rails_bool, json_schema_input_type=bool | str | int | None)]


class ClaimIn(BaseModel):
    """``PATCH /tasks/{id}/claim``: the agent's session (accepted, not stored)."""

    model_config = ConfigDict(extra="ignore")

    session_id: str | None = None
    session_key: str | None = None


class NoteIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    activity_note: str | None = None


class ProgressIn(BaseModel):
    """``PATCH /tasks/{id}``: a progress note, as ``{"task": {"activity_note": …}}`` or at the top level."""

    model_config = ConfigDict(extra="ignore")

    task: NoteIn | None = None
    activity_note: str | None = None


def _when(value: Any) -> Any:
    """An ISO 8601 time (``Z`` or an offset; none means UTC) as epoch seconds; empty means not given."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError("an ISO 8601 time such as 2026-02-05T16:00:00Z")
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"not an ISO 8601 time: {value[:40]!r}") from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


class RateLimitIn(BaseModel):
    """``POST /tasks/{id}/report_rate_limit``: the active run hit a rate or usage limit."""

    model_config = ConfigDict(extra="ignore")

    model_name: str | None = Field(None, description="Informational: clawq cools the model the run is on.")
    error_message: str | None = Field(None, description="The provider's text; its reset time is parsed from it.")
    resets_at: Annotated[float | None, BeforeValidator(_when, json_schema_input_type=str | None)] = Field(
        None, description="ISO 8601; wins over a reset parsed from error_message.")
    auto_fallback: Flag = Field(None, description="Accepted; clawq's next claim falls back along the chain anyway.")


class ModelLimit(BaseModel):
    model: str
    limited: bool
    resets_at: str | None
    resets_in: str | None = Field(description='Time left, as ClawTrol writes it ("45s", "12m", "3h 5m", "2d 4h").')


class RateLimitOut(BaseModel):
    task: ClawtrolTask
    model_limit: ModelLimit


def resets_in(seconds: float) -> str | None:
    """Time left in ClawTrol's short form; None when nothing is left."""
    s = math.floor(seconds)
    if s <= 0:
        return None
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86_400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86_400}d {s % 86_400 // 3600}h"


def _first(data: dict[str, Any], names: tuple[str, ...]) -> Any:
    return next((data[n] for n in names if data.get(n) is not None), None)


class AgentCompleteIn(BaseModel):
    """``POST /tasks/{id}/agent_complete``: the active run is done; the task goes to review."""

    model_config = ConfigDict(extra="ignore")

    output: str = Field("", description="Kept as the run's summary (also read from description, summary, "
                                        "result, text, message or content).")
    files: list[str] = Field(default_factory=list, description="Kept as the run's evidence (also read from "
                             "output_files, created_files, changed_files or modified_files; text is split "
                             "at commas and newlines).")

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        files = _first(data, FILE_NAMES)
        if isinstance(files, str):
            files = [f.strip() for f in files.replace("\n", ",").split(",") if f.strip()]
        out = {"output": _first(data, OUTPUT_NAMES), "files": files}
        return {k: v for k, v in out.items() if v is not None}

    @model_validator(mode="after")
    def _sizes(self) -> AgentCompleteIn:
        try:
            self.outcome()
        except ValidationError as err:
            raise ValueError(str(err.errors()[0]["msg"]).removeprefix("Value error, ")) from None
        return self

    def outcome(self) -> Outcome:
        return Outcome(summary=self.output, evidence=self.files or None)
