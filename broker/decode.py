"""Replies to values: Redis answers (bytes or text, RESP2 or RESP3) turned into the broker's types."""

from __future__ import annotations

import json
from typing import Any

from .models import Task, TaskStatus

__all__ = ["event", "ms_to_s", "skips", "task_from", "text", "texts", "to_str", "with_open_run", "xread_rows"]


def text(value: Any) -> Any:
    """``value`` decoded when it is bytes, else unchanged (a client may or may not decode replies)."""
    return value.decode("utf-8") if isinstance(value, bytes) else value


def to_str(value: Any) -> str:
    return str(text(value))


def texts(fields: dict[Any, Any]) -> dict[str, str]:
    return {str(text(k)): str(text(v)) for k, v in fields.items()}


def ms_to_s(value: str | None) -> float | None:
    """A stored epoch-ms field in seconds; None when absent or 0."""
    return int(value) / 1000 if value and value != "0" else None


def skips(pairs: list[Any]) -> dict[str, int]:
    """Skip reasons from a script's flat ``reason, count, ...`` reply."""
    return {str(pairs[i]): int(pairs[i + 1]) for i in range(0, len(pairs), 2)}


def _route(ck: str) -> tuple[str | None, str | None]:
    """(chain, pinned model) from a chain key: ``c:<chain>`` or ``m:<model>``."""
    kind, _, name = ck.partition(":")
    return (name or None, None) if kind == "c" else (None, name or None)


def task_from(task_id: int, f: dict[str, str], context: list[Any], runs: list[Any]) -> Task:
    """A task from its hash; a field left out (see ``Keys.task``) takes its default."""
    chain, model = _route(f.get("ck", ""))
    created = int(f.get("at") or f.get("created_at") or 0)  # created_at: a hash written before `at`
    return Task(
        task_id=task_id,
        board=f["board"],
        title=f.get("title", ""),
        prompt=f.get("prompt", ""),
        chain=chain,
        model=model,
        status=TaskStatus(f["status"]),
        run_count=int(f.get("run_count", 0)),
        attempts=int(f.get("attempts", 0)),
        run_id=f.get("run_id") or None,
        running_model=f.get("model") or None,
        running_provider=f.get("provider") or None,
        lease_deadline=ms_to_s(f.get("lease_deadline")),
        backoff_until=ms_to_s(f.get("backoff_until")),
        last_error=f.get("last_error") or None,
        last_error_reason=f.get("last_error_reason") or None,
        created_at=created / 1000,
        updated_at=int(f.get("updated_at", created)) / 1000,
        not_before=ms_to_s(f.get("not_before")),
        night_only=f.get("night") == "1",
        due_at=ms_to_s(f.get("due_at")),
        schedule=int(f["schedule"]) if f.get("schedule") else None,
        context=[json.loads(text(x)) for x in context],
        runs=[json.loads(text(x)) for x in runs],
    )


def with_open_run(f: dict[str, str], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``runs`` (a task's history, read whole) with the active run as its last entry.

    A run's entry is written once, at its end; while it runs, the claim's facts are in the task hash
    (``night_run`` present). A run claimed before that field existed has its open entry in the list already.
    """
    run_id = f.get("run_id")
    if f.get("status") != "in_progress" or not run_id or "night_run" not in f:
        return runs
    if runs and runs[-1].get("run_id") == run_id:
        return runs
    runs.append({"run_id": run_id, "board": f["board"], "model": f.get("model"), "provider": f.get("provider"),
                 "run_count": int(f.get("run_count", 0)) + 1, "attempt": int(f.get("attempts", 0)) + 1,
                 "claimed_at": int(f.get("claimed_at") or 0) / 1000, "night": f["night_run"] == "1"})
    return runs


def event(eid: Any, fields: dict[Any, Any]) -> dict[str, Any]:
    """One event stream entry as a document: its id, its fields, ``task_id`` an int, ``at`` epoch seconds."""
    doc: dict[str, Any] = {"id": str(text(eid)), **texts(fields)}
    if "task_id" in doc:
        doc["task_id"] = int(doc["task_id"])
    doc["at"] = int(doc.get("at", 0)) / 1000
    return doc


def xread_rows(reply: Any) -> list[tuple[Any, dict[Any, Any]]]:
    """Rows of an XREAD reply, RESP2 (``[[stream, rows]]``) or RESP3 (``{stream: [rows]}``)."""
    if not reply:
        return []
    groups = list(reply.values()) if isinstance(reply, dict) else [group[1] for group in reply]
    rows: list[tuple[Any, dict[Any, Any]]] = []
    for group in groups:
        if group and isinstance(group[0], list):
            group = group[0]
        rows.extend(group)
    return rows
