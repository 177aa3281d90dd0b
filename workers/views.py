"""Terminal views (rich): the queue at a glance for ``clawq top`` and ``clawq simulate``, and the verdict."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from clawq.broker import Broker
from clawq.broker.events import EventType

__all__ = ["LiveView", "print_report", "queue_view"]

_EVENT_TYPES = frozenset({
    EventType.CLAIMED, EventType.COMPLETED, EventType.FOLLOW_UP, EventType.FAILED, EventType.TIMEOUT,
    EventType.RATE_LIMIT, EventType.QUOTA_REACHED, EventType.RELEASED, EventType.DUE, EventType.SCHEDULE_SKIPPED,
    EventType.SCHEDULE_MISSED,
})


def _boards_table(health: dict[str, Any]) -> Table:
    table = Table(title="boards", expand=False)
    for col in ("board", "done/h", "queued", "scheduled", "running", "why waiting"):
        table.add_column(col)
    for name, b in health["boards"].items():
        run = b.get("running")
        running = f"#{run['task_id']} {run['model']} {run['elapsed_s'] or 0:.0f}s" if run else "-"
        table.add_row(name, str(b["completed_last_hour"]), str(b["queue_depth"]), str(b.get("scheduled", 0)),
                      running, b.get("why_waiting", b["state"]))
    return table


def _header(health: dict[str, Any]) -> str:
    g = health["global"]
    mode = "night" if g["night"] else "day"
    return f"[bold]clawq[/bold] {mode}: {g['in_progress']}/{g['max_concurrent']} in progress"


def _errors_table(health: dict[str, Any]) -> Table:
    table = Table(title="recent errors", expand=False)
    for col in ("reason", "task", "board", "model", "message"):
        table.add_column(col)
    for e in health["recent_errors"][:6]:
        table.add_row(e["reason"], str(e["task_id"]), e["board"], e["model"], str(e["message"])[:60])
    return table


def queue_view(broker: Broker) -> Group:
    """One frame of `clawq top`: header, boards, models, recent events and errors."""
    health = broker.health()
    return Group(_header(health), _boards_table(health), _models_table(health), _events_table(broker),
                 _errors_table(health))


def _models_table(health: dict[str, Any]) -> Table:
    table = Table(title="models", expand=False)
    for col in ("model", "inflight", "cooling", "failures"):
        table.add_column(col)
    for name, m in health["models"].items():
        cap = m["cap"] if m["cap"] is not None else "∞"
        cool = f"{m['cooldown_remaining_s']:.1f}s" if m["cooldown_remaining_s"] else "-"
        table.add_row(name, f"{m['inflight']}/{cap}", cool, str(m["failures"]))
    return table


def _events_table(broker: Broker) -> Table:
    table = Table(title="recent events", expand=False)
    for col in ("type", "task", "board", "model"):
        table.add_column(col)
    shown = 0
    for fields in broker.latest_events(40):
        if fields.get("type") in _EVENT_TYPES and shown < 8:
            table.add_row(fields["type"], str(fields.get("task_id", "")), fields.get("board", ""),
                          fields.get("model", ""))
            shown += 1
    return table


class LiveView:
    """A full-screen-ish live table on a terminal; one progress line every few seconds elsewhere."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live: Live | None = None
        self._last_line = 0.0

    def __call__(self, broker: Broker) -> None:
        health = broker.health()
        if self.console.is_terminal:
            group = Group(_boards_table(health), _models_table(health), _events_table(broker))
            if self.live is None:
                self.live = Live(group, console=self.console, refresh_per_second=4, transient=True)
                self.live.start()
            self.live.update(group)
        elif time.monotonic() - self._last_line >= 5:
            self._last_line = time.monotonic()
            g = health["global"]
            queued = sum(b["queue_depth"] for b in health["boards"].values())
            self.console.print(f"in progress {g['in_progress']}/{g['max_concurrent']}, queued {queued}")

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()


def print_report(console: Console, report: dict[str, Any]) -> None:
    """The verdict: the run in figures, then each criterion with its violations."""
    outcomes = report["outcomes"]
    by_status: dict[str, int] = {}
    for o in outcomes:
        by_status[o["status"]] = by_status.get(o["status"], 0) + 1
    console.print(f"[bold]clawq simulate[/bold] on {report['redis']}: {len(outcomes)} tasks, "
                  f"{len(report['runs'])} runs in {report['wall_s']:.1f}s · "
                  + ", ".join(f"{k} {v}" for k, v in sorted(by_status.items())))
    causes = ", ".join(f"{k} {v}" for k, v in sorted(report["events_by_root_cause"].items())) or "none"
    console.print(f"faults: {causes} · workers killed: {len(report['kills'])} · "
                  f"notifications: {len(report['notifications'])}")
    table = Table(show_header=True)
    table.add_column("criterion")
    table.add_column("holds")
    table.add_column("detail")
    for name, c in report["criteria"].items():
        detail = "; ".join(c["violations"][:3]) or ", ".join(
            f"{k}={v}" for k, v in c.items() if k not in ("ok", "violations"))
        table.add_row(name, "[green]yes[/green]" if c["ok"] else "[red]NO[/red]", detail)
    console.print(table)
    console.print("[green]every criterion holds[/green]" if report["ok"] else
                  "[red]a criterion failed[/red] (the tail of each process's log is in the JSON report: "
                  "--json or --report FILE)")


