"""``clawq``: the admin CLI, a thin click layer over :class:`broker.Broker`.

Exit codes: 0 ok, 2 bad input, 3 nothing to claim, 4 run fenced, 1 anything else; errors are one line on
stderr (and, with --json, a ``{"error": ...}`` document on stdout), never a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import click

from clawq.broker import (
    BreakerState,
    BreakerStatus,
    Broker,
    ClawqError,
    NothingToClaim,
    Outcome,
    RedisUnavailable,
    Task,
    TaskStatus,
    load_config_file,
)
from clawq.broker.errors import InputError
from clawq.broker.memory import MemoryState
from clawq.broker.schedules import Schedules

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
EXIT_BAD_INPUT = 2


@dataclass
class Ctx:
    """What the group options resolved to; commands may override each."""

    redis_url: str
    namespace: str
    as_json: bool = False
    _broker: Broker | None = None

    def broker(self) -> Broker:
        if self._broker is None:
            self._broker = Broker.from_url(self.redis_url, self.namespace)
        return self._broker

    def daemon_broker(self, what: str, stop: threading.Event | None = None) -> Broker | None:
        """The broker of a long-running command: while Redis does not answer, say so once and wait for it
        (None when ``stop`` is set meanwhile)."""
        from clawq.broker.waiting import connect_when_ready

        def waiting(err: ClawqError) -> None:
            logging.getLogger(f"clawq.{what}").error("%s; waiting for Redis to answer", err)

        if self._broker is None:
            self._broker = connect_when_ready(self.redis_url, self.namespace, on_wait=waiting, stop=stop)
        return self._broker


def _apply(ctx: click.Context, redis_url: str | None, namespace: str | None, as_json: bool) -> Ctx:
    obj = ctx.find_object(Ctx)
    assert obj is not None
    if redis_url is not None:
        obj.redis_url = redis_url
    if namespace is not None:
        obj.namespace = namespace
    obj.as_json = obj.as_json or as_json
    return obj


def command_options(fn: F) -> F:
    """Every command takes --redis-url, --namespace and --json (after the command name too)."""

    @click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
    @click.option("--namespace", default=None, help="Queue namespace (env CLAWQ_NAMESPACE).")
    @click.option("--redis-url", default=None, help="Redis URL (env CLAWQ_REDIS_URL).")
    @functools.wraps(fn)
    def wrapper(redis_url: str | None, namespace: str | None, as_json: bool, **kw: Any) -> Any:
        return fn(_apply(click.get_current_context(), redis_url, namespace, as_json), **kw)

    return wrapper  # type: ignore[return-value]


_CONTROL = {c: f"\\x{c:02x}" for c in [*range(32), 127]} | {10: "\\n", 13: "\\r", 9: "\\t"}


def _clean(text: str) -> str:
    """User text for a terminal: control characters shown escaped (no forged lines, no escape sequences)."""
    return text.translate(_CONTROL)


def emit(obj: Ctx, doc: Any, text: str) -> None:
    """Print ``doc`` as JSON with --json, else the human line(s) ``text``."""
    click.echo(json.dumps(doc, default=str) if obj.as_json else text)


def _fail(as_json: bool, message: str, code: int, doc: dict[str, Any] | None = None) -> NoReturn:
    if as_json:
        click.echo(json.dumps(doc if doc is not None else {"error": message, "exit_code": code}))
    click.echo(f"clawq: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--redis-url", envvar="CLAWQ_REDIS_URL", default=DEFAULT_REDIS_URL, show_default=True,
              help="Redis URL (env CLAWQ_REDIS_URL).")
@click.option("--namespace", envvar="CLAWQ_NAMESPACE", default="default", show_default=True,
              help="Queue namespace (env CLAWQ_NAMESPACE).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.version_option(package_name="clawq")
@click.pass_context
def cli(ctx: click.Context, redis_url: str, namespace: str, as_json: bool) -> None:
    """clawq: a Redis-native queue broker for boards of AI-agent tasks."""
    ctx.obj = Ctx(redis_url=redis_url, namespace=namespace, as_json=as_json)


TASK = click.argument("task_id", metavar="TASK", type=click.IntRange(min=1))
RUN = click.argument("run_id", metavar="RUN_ID")


# -- tasks ---------------------------------------------------------------------------------------------
@cli.command()
@click.option("--board", required=True, help="Board name: letters, digits, '.', '_', '-' (1-64).")
@click.option("--chain", default=None, help="Fallback chain name (e.g. coding).")
@click.option("--model", default=None, help="Pin the task to one model instead of a chain.")
@click.option("--id", "task_id", type=click.IntRange(min=1), default=None, help="Use this task id.")
@click.option("--prompt", default="", help="The agent prompt.")
@click.option("--not-before", "not_before", default=None, metavar="T",
              help="Wait until T: ISO 8601, or HH:MM (the next such time in the night window's zone, else UTC).")
@click.option("--night-only", is_flag=True, help="Start only inside the night window.")
@click.argument("title")
@command_options
def add(obj: Ctx, board: str, chain: str | None, model: str | None, task_id: int | None, prompt: str,
        not_before: str | None, night_only: bool, title: str) -> None:
    """Queue a task at its place (its task_id) on BOARD, or schedule it (--not-before, --night-only)."""
    broker = obj.broker()
    at = broker.parse_time(not_before) if not_before is not None else None
    done = broker.add_task(board, title, chain=chain, model=model, prompt=prompt, task_id=task_id, not_before=at,
                           night_only=night_only)
    tid = done.task_id
    doc: dict[str, Any] = {"task_id": tid, "board": board, "status": done.status.value}
    text = f"added task {tid} to board {board}"
    if done.due_at is not None:
        doc["due_at"] = done.due_at
        text += f" (scheduled: due {_when(done.due_at)})"
    emit(obj, doc, text)


@cli.command()
@command_options
def claim(obj: Ctx) -> None:
    """Claim the next task that may run now (exit 3 when none can)."""
    try:
        c = obj.broker().claim()
    except NothingToClaim as err:
        _fail(obj.as_json, str(err), err.exit_code, {"claimed": False, "skip_reasons": err.skip_reasons})
    doc = {"claimed": True, **c.model_dump(exclude={"lease_deadline"})}
    emit(obj, doc, f"claimed task {c.task_id} on {c.board}: model {c.model} ({c.provider}), run {c.run_id}")


@cli.command()
@TASK
@RUN
@command_options
def heartbeat(obj: Ctx, task_id: int, run_id: str) -> None:
    """Extend the lease of run RUN_ID of TASK (exit 4 when fenced)."""
    deadline = obj.broker().heartbeat(task_id, run_id)
    emit(obj, {"task_id": task_id, "run_id": run_id, "lease_deadline": deadline},
         f"lease of task {task_id} extended to {_when(deadline)}")


@cli.command()
@TASK
@RUN
@click.option("--follow-up", is_flag=True, help="The task needs another run (same task, same place).")
@click.option("--next-prompt", default=None, help="The prompt of the follow-up run (required with it).")
@click.option("--summary", default="", help="What the run did.")
@command_options
def complete(obj: Ctx, task_id: int, run_id: str, follow_up: bool, next_prompt: str | None,
             summary: str) -> None:
    """Record the outcome of run RUN_ID of TASK."""
    try:
        outcome = Outcome(needs_follow_up=follow_up, next_prompt=next_prompt, summary=summary)
    except ValueError as err:
        raise InputError(_first_error(err)) from None
    done = obj.broker().complete(task_id, run_id, outcome)
    doc = {"task_id": task_id, "status": done.status.value, "run_count": done.run_count}
    if done.repeated:
        doc["repeated"] = True
    if done.note:
        doc["note"] = done.note
    emit(obj, doc, f"task {task_id} is {done.status.value} after {done.run_count} run(s)"
         + (" (outcome already recorded)" if done.repeated else "") + (f"; {done.note}" if done.note else ""))


@cli.command()
@TASK
@RUN
@click.option("--reason", required=True, help="What went wrong.")
@click.option("--no-retry", is_flag=True, help="Fail the task for good now.")
@command_options
def fail(obj: Ctx, task_id: int, run_id: str, reason: str, no_retry: bool) -> None:
    """Record that run RUN_ID of TASK failed."""
    status, attempts = obj.broker().fail(task_id, run_id, reason, retry=not no_retry)
    emit(obj, {"task_id": task_id, "status": status.value, "attempts": attempts},
         f"task {task_id} is {status.value} after {attempts} failed attempt(s)")


@cli.command("rate-limited")
@TASK
@RUN
@click.option("--retry-after", type=float, default=None, help="Seconds until the model may be used again.")
@click.option("--message", default="", help="The provider's message; its reset time is parsed.")
@command_options
def rate_limited(obj: Ctx, task_id: int, run_id: str, retry_after: float | None, message: str) -> None:
    """Record that run RUN_ID of TASK hit a rate or usage limit: its model cools down."""
    model, until = obj.broker().rate_limited(task_id, run_id, retry_after=retry_after, message=message)
    emit(obj, {"task_id": task_id, "status": "up_next", "model": model, "cooldown_until": until},
         f"model {model} cools down until {_when(until)}; task {task_id} is back at its board head")


@cli.command()
@command_options
def reap(obj: Ctx) -> None:
    """Requeue every task whose lease expired."""
    ids = obj.broker().reap()
    emit(obj, {"requeued": ids}, f"requeued {len(ids)} task(s): {', '.join(map(str, ids)) or '-'}")


@cli.command()
@TASK
@command_options
def show(obj: Ctx, task_id: int) -> None:
    """Show TASK with its context and run history."""
    task = obj.broker().get_task(task_id)
    doc = task.model_dump(mode="json")
    lines = [f"task {task.task_id} [{task.status.value}] on {task.board}: {_clean(task.title)}",
             f"  chain {task.chain or '-'}  model {task.model or '-'}  runs {task.run_count}  "
             f"attempts {task.attempts}"]
    if task.due_at is not None or task.not_before is not None or task.night_only or task.schedule:
        lines.append("  " + "  ".join(part for part in (
            f"due {_when(task.due_at)}" if task.due_at is not None else "",
            f"not before {_when(task.not_before)}" if task.not_before is not None else "",
            "night-only" if task.night_only else "",
            f"from schedule {task.schedule}" if task.schedule else "") if part))
    lines += [f"  run {r.get('run_id')} {r.get('model')} -> {r.get('outcome', 'running')}{_run_usage(r)}"
              for r in task.runs]
    if task.last_error:
        lines.append(f"  last error ({task.last_error_reason}): {_clean(task.last_error)}")
    emit(obj, doc, "\n".join(lines))


def _tokens(n: Any) -> str:
    if not isinstance(n, int | float):
        return "?"
    return f"{n / 1000:.1f}k" if n >= 1000 else str(int(n))


def _run_usage(run: dict[str, Any]) -> str:
    """`` session <id> · 15.6k in / 6 out · $0.0080`` for a run whose agent CLI said so."""
    parts = []
    if run.get("session_id"):
        parts.append(f"session {_clean(str(run['session_id']))}")
    usage = run.get("usage") or {}
    if usage.get("input_tokens") is not None or usage.get("output_tokens") is not None:
        parts.append(f"{_tokens(usage.get('input_tokens'))} in / {_tokens(usage.get('output_tokens'))} out")
    if usage.get("cost_usd") is not None:
        parts.append(f"${usage['cost_usd']:.4f}")
    return ("  · " + " · ".join(parts)) if parts else ""


@cli.command("ls")
@click.option("--board", default=None, help="Only this board.")
@click.option("--status", type=click.Choice([s.value for s in TaskStatus]), default=None)
@command_options
def ls_(obj: Ctx, board: str | None, status: str | None) -> None:
    """List tasks (id order)."""
    tasks = obj.broker().list_tasks(board=board, status=TaskStatus(status) if status else None)
    doc = [t.model_dump(mode="json", exclude={"context", "runs", "prompt"}) for t in tasks]
    text = "\n".join(f"{t.task_id:>6}  {t.status.value:<11}  {t.board:<16}  {_clean(t.title)}{_due(t)}"
                     for t in tasks)
    emit(obj, doc, text or "no tasks")


def _due(task: Task) -> str:
    """`` (due <time>)`` for a scheduled task, `` night-only`` for one that waits for the night."""
    night = " night-only" if task.night_only else ""
    if task.due_at is not None:
        return f"  (due {_when(task.due_at)}{',' if night else ''}{night})"
    return f"  ({night.strip()})" if night and not task.status.final else ""


@cli.command()
@TASK
@command_options
def cancel(obj: Ctx, task_id: int) -> None:
    """Cancel TASK wherever it is (a running run loses its lease)."""
    was = obj.broker().cancel(task_id)
    emit(obj, {"task_id": task_id, "status": "cancelled", "was": was.value}, f"task {task_id} cancelled")


CREATE = click.option("--create", is_flag=True, help="Accept a board that has no task yet (it is created).")


def _known_board(b: Broker, board: str, create: bool) -> None:
    """A typo must not create a board that never goes away: an unknown board needs --create."""
    if not create and not b.board_exists(board):
        raise InputError(f"unknown board {board!r}: no task was ever added to it; check the name, or give "
                         "--create to make it")


@cli.command()
@click.argument("board")
@CREATE
@command_options
def pause(obj: Ctx, board: str, create: bool) -> None:
    """Stop claiming tasks of BOARD (a running task may finish)."""
    _known_board(obj.broker(), board, create)
    obj.broker().pause(board)
    emit(obj, {"board": board, "paused": True}, f"board {board} paused")


@cli.command()
@click.argument("board")
@CREATE
@command_options
def resume(obj: Ctx, board: str, create: bool) -> None:
    """Claim tasks of BOARD again."""
    _known_board(obj.broker(), board, create)
    obj.broker().resume(board)
    emit(obj, {"board": board, "paused": False}, f"board {board} resumed")


# -- cooldowns -----------------------------------------------------------------------------------------
@cli.group()
def cooldown() -> None:
    """Set, clear or list model cooldowns."""


@cooldown.command("set")
@click.argument("model")
@click.argument("seconds", type=click.FloatRange(min=0))
@command_options
def cooldown_set(obj: Ctx, model: str, seconds: float) -> None:
    """Cool MODEL for exactly SECONDS from now."""
    until = obj.broker().set_cooldown(model, seconds)
    emit(obj, {"model": model, "until": until}, f"model {model} cools down until {_when(until)}")


@cooldown.command("clear")
@click.argument("model")
@command_options
def cooldown_clear(obj: Ctx, model: str) -> None:
    """End MODEL's cooldown now."""
    obj.broker().clear_cooldown(model)
    emit(obj, {"model": model, "until": None}, f"model {model} is not cooling down")


@cooldown.command("ls")
@command_options
def cooldown_ls(obj: Ctx) -> None:
    """Models cooling down now."""
    cooling = obj.broker().cooldowns()
    text = "\n".join(f"{m:<16} {c['remaining_s']:>9.1f}s  {c['reason']}" for m, c in cooling.items())
    emit(obj, cooling, text or "no model is cooling down")


# -- recurring schedules -------------------------------------------------------------------------------
@cli.group()
def schedule() -> None:
    """Recurring tasks: each firing of a cron schedule adds a task (clawq dispatch fires them)."""


@schedule.command("add")
@click.option("--cron", "cron", required=True, help='Five cron fields, e.g. "0 23 * * 1-5".')
@click.option("--tz", "zone", default="UTC", show_default=True, help="IANA time zone of the cron fields.")
@click.option("--board", required=True, help="Board the tasks go to.")
@click.option("--chain", default=None, help="Fallback chain name (e.g. coding).")
@click.option("--model", default=None, help="Pin the tasks to one model instead of a chain.")
@click.option("--prompt", default="", help="The agent prompt.")
@click.argument("title")
@command_options
def schedule_add(obj: Ctx, cron: str, zone: str, board: str, chain: str | None, model: str | None, prompt: str,
                 title: str) -> None:
    """Add a schedule that queues TITLE on BOARD at every firing of --cron."""
    s = Schedules(obj.broker()).add(cron, board, title, tz=zone, chain=chain, model=model, prompt=prompt)
    emit(obj, s.model_dump(mode="json"),
         f"added schedule {s.schedule_id} ({s.cron} {s.tz}) on board {s.board}; next {_when(s.next_fire)}")


@schedule.command("ls")
@command_options
def schedule_ls(obj: Ctx) -> None:
    """Every schedule, with its next firing and what its firings did."""
    listed = Schedules(obj.broker()).ls()
    text = "\n".join(
        f"{s.schedule_id:>4}  {s.cron:<16} {s.tz:<20} {s.board:<16} next {_when(s.next_fire)}  "
        f"fired {s.fired} skipped {s.skipped} missed {s.missed}  {_clean(s.title)}" for s in listed)
    emit(obj, [s.model_dump(mode="json") for s in listed], text or "no schedules")


@schedule.command("rm")
@click.argument("schedule_id", metavar="ID", type=click.IntRange(min=1))
@command_options
def schedule_rm(obj: Ctx, schedule_id: int) -> None:
    """Remove schedule ID (the tasks it added stay)."""
    Schedules(obj.broker()).remove(schedule_id)
    emit(obj, {"schedule_id": schedule_id, "removed": True}, f"removed schedule {schedule_id}")


# -- provider breakers ---------------------------------------------------------------------------------
@cli.group()
def breaker() -> None:
    """List, open or close the providers' circuit breakers."""


def _breaker_line(b: BreakerState) -> str:
    left = f"  {b.remaining_s:.0f}s left" if b.state is BreakerStatus.OPEN else ""
    cause = f"  ({b.cause})" if b.cause else ""
    probe = f"  probe: task {b.probe_task}" if b.probe_task is not None else ""
    return f"{b.provider:<16} {b.state.value:<10}{left}{cause}{probe}"


@breaker.command("ls")
@command_options
def breaker_ls(obj: Ctx) -> None:
    """Each provider's breaker: closed, open (with the time left) or half_open."""
    states = obj.broker().breakers()
    emit(obj, {p: s.model_dump(mode="json") for p, s in states.items()},
         "\n".join(_breaker_line(s) for s in states.values()) or "no provider is configured")


@breaker.command("open")
@click.argument("provider")
@click.argument("minutes", type=float)
@command_options
def breaker_open(obj: Ctx, provider: str, minutes: float) -> None:
    """Open PROVIDER's breaker for exactly MINUTES (then one probe run may go)."""
    st = obj.broker().open_breaker(provider, minutes)
    emit(obj, st.model_dump(mode="json"), f"provider {provider} is open until {_when(st.until or 0)}")


@breaker.command("close")
@click.argument("provider")
@command_options
def breaker_close(obj: Ctx, provider: str) -> None:
    """Close PROVIDER's breaker fully, at once."""
    st = obj.broker().close_breaker(provider)
    emit(obj, st.model_dump(mode="json"), f"provider {provider} is closed")


# -- config --------------------------------------------------------------------------------------------
@cli.group()
def config() -> None:
    """Load or show the namespace's configuration."""


@config.command("load")
@click.argument("path", type=click.Path(dir_okay=False))
@command_options
def config_load(obj: Ctx, path: str) -> None:
    """Validate the YAML file PATH and make it the effective config."""
    cfg = load_config_file(path)
    version = obj.broker().load_config(cfg)
    emit(obj, {"loaded": True, "version": version}, f"config version {version} loaded from {path}")


@config.command("show")
@command_options
def config_show(obj: Ctx) -> None:
    """Print the effective config (same structure as the YAML)."""
    cfg = obj.broker().config()
    doc = cfg.model_dump(mode="json")
    emit(obj, doc, _yaml(doc))


def _yaml(doc: Any) -> str:
    import yaml

    return str(yaml.safe_dump(doc, sort_keys=False, default_flow_style=None)).rstrip()


# -- watching ------------------------------------------------------------------------------------------
@cli.command()
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events.")
@click.option("--count", "-n", type=click.IntRange(min=1, max=10000), default=50,
              help="How many past events (the last N that match --reason/--board).")
@click.option("--reason", default=None, help="Only this type or root cause (timeout, rate_limit, failed, …).")
@click.option("--board", default=None, help="Only this board.")
@command_options
def events(obj: Ctx, follow: bool, count: int, reason: str | None, board: str | None) -> None:
    """Print recent events (one JSON line each with --json), and new ones with --follow."""
    b = obj.broker()

    def keep(row: dict[str, Any]) -> bool:
        return (reason is None or reason in (row.get("type"), row.get("reason"))) and (
            board is None or row.get("board") == board)

    if not follow:
        rows = b.last_events(count, keep)
        if obj.as_json:
            click.echo(json.dumps(rows))
            return
        for row in rows:
            _print_event(obj, row)
        return
    stop = threading.Event()  # Ctrl-C / SIGTERM end the follow cleanly, between two blocking reads
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    last = _latest_id(b)
    while not stop.is_set():
        for row in b.wait_events(last, block_ms=1000):
            last = row["id"]
            if keep(row):
                _print_event(obj, row)


@cli.command()
@click.option("--interval", type=click.FloatRange(min=0.2, max=60), default=1.0, show_default=True)
@click.option("--once", is_flag=True, help="Print one frame and exit.")
@command_options
def top(obj: Ctx, interval: float, once: bool) -> None:
    """A live full-screen view of boards, models, events and errors; q quits."""
    from rich.console import Console
    from rich.live import Live

    from clawq.workers.views import queue_view

    console = Console()
    if once or not console.is_terminal:
        console.print(queue_view(obj.broker()))
        return
    with _keys_raw() as key_pressed, Live(_top_frame(obj), console=console, screen=True) as live:
        while not key_pressed("q"):
            live.update(_top_frame(obj))


def _top_frame(obj: Ctx) -> Any:
    """One frame of ``clawq top``; while Redis does not answer, a line that says so (the view rides out a
    blip and resumes by itself)."""
    from rich.text import Text

    from clawq.workers.views import queue_view

    try:
        return queue_view(obj.broker())
    except RedisUnavailable as err:
        return Text(f"clawq top: {err}; retrying every second (q quits)", style="bold red")


@contextlib.contextmanager
def _keys_raw() -> Iterator[Callable[[str], bool]]:
    """Read single key presses without echo; yields `pressed(key)`, which waits up to 1 s for one."""
    import select
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def pressed(key: str) -> bool:
        ready, _, _ = select.select([sys.stdin], [], [], 1.0)
        return bool(ready) and sys.stdin.read(1).lower() == key

    try:
        yield pressed
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (loopback by default).")
@click.option("--port", type=click.IntRange(1, 65535), default=8765, show_default=True)
@command_options
def serve(obj: Ctx, host: str, port: int) -> None:
    """The HTTP API, Prometheus /metrics and a live status page (needs `pip install "clawq[server]"`)."""
    import importlib
    import os

    try:  # an optional extra: imported by name so the core install never needs it
        app = importlib.import_module("clawq.server.app")
    except ImportError as err:
        raise ClawqError(f'clawq serve needs the server extra: pip install "clawq[server]" ({err})') from None
    app.serve(obj.redis_url, obj.namespace, host=host, port=port, token=os.environ.get("CLAWQ_API_TOKEN") or None,
              say=lambda line: click.echo(line, err=True))


def _latest_id(b: Broker) -> str:
    return b.latest_event_id()


def _print_event(obj: Ctx, row: dict[str, Any]) -> None:
    if obj.as_json:
        click.echo(json.dumps(row))
        return
    extras = " ".join(f"{k}={_clean(str(v))}" for k, v in row.items() if k not in ("id", "type", "at"))
    click.echo(f"{_when(row['at'])}  {row['type']:<14} {extras}")


@cli.command()
@command_options
def health(obj: Ctx) -> None:
    """Queue depth, in-progress and throughput per board; inflight, caps and cooldowns per model."""
    doc = obj.broker().health()
    g = doc["global"]
    lines = [f"{'night' if g['night'] else 'day'}: {g['in_progress']}/{g['max_concurrent']} in progress"]
    lines += _namespace_lines(doc.get("namespace") or {})
    evicts = MemoryState(policy=(doc.get("redis") or {}).get("maxmemory_policy")).warning()
    if evicts:
        lines.append(f"  WARNING {evicts}")
    for name, bd in doc["boards"].items():
        lines.append(f"  board {name:<16} queued {bd['queue_depth']:>4}  running {bd['in_progress']}  "
                     f"done/h {bd['completed_last_hour']:>3}  {bd.get('why_waiting', bd['state'])}")
    for name, m in doc["models"].items():
        cool = f"  cooling {m['cooldown_remaining_s']:.0f}s" if m["cooldown_remaining_s"] else ""
        lines.append(f"  model {name:<16} {m['inflight']}/{m['cap'] if m['cap'] is not None else '-'}"
                     f"  failures {m['failures']}{cool}")
    if doc.get("usage"):
        lines.append("  cost  " + " · ".join(
            f"{name} ${u['cost_usd']:.2f} ({_tokens(u['input_tokens'])} in, {_tokens(u['output_tokens'])} out)"
            for name, u in doc["usage"].items()))
    for name, p in doc["providers"].items():
        br = p["breaker"]
        left = f" {br['remaining_s']:.0f}s left" if br["state"] == "open" else ""
        lines.append(f"  provider {name:<13} {p['inflight']}/{p['cap'] if p['cap'] is not None else '-'}"
                     f"  breaker {br['state']}{left}")
    for e in doc["recent_errors"][:5]:
        lines.append(f"  error {e['reason']:<13} task {e['task_id']} ({e['board']}, {e['model']}): "
                     f"{_clean(str(e['message']))}")
    emit(obj, doc, "\n".join(lines))


@cli.group()
def agents() -> None:
    """The agent CLIs of the configured models."""


@agents.command("check")
@command_options
def agents_check(obj: Ctx) -> None:
    """For each model: is its CLI on PATH, and what does --version say; for each board: does its workdir
    exist. From the config loaded in Redis; never sends a prompt. Exit 1 when something is missing."""
    from clawq.workers.agents.check import check_agents, check_table

    doc = check_agents(obj.broker().config())
    emit(obj, doc, check_table(doc))
    if not doc["ok"]:
        sys.exit(1)


def _warn_if_evicting(b: Broker, what: str) -> None:
    """At a daemon's start: a loud warning when Redis may evict clawq's keys (any policy but noeviction)."""
    evicts = b.memory().warning()
    if evicts:
        logging.getLogger(f"clawq.{what}").warning("WARNING %s", evicts)


def _namespace_lines(ns: dict[str, Any]) -> list[str]:
    """What health and doctor say about the namespace itself: re-created after a wipe, and when."""
    again = ns.get("recreated")
    if not again:
        return []
    return [f"  WARNING namespace {ns.get('name')} was re-created at {_when(again['at'])}: it was wiped (Redis "
            f"restarted without persistence, failed over to an empty replica, or was flushed) and every task of "
            f"{again.get('previous_id') or '?'} was lost; noticed by {again.get('noticed_by') or '?'}"]


# -- running -------------------------------------------------------------------------------------------
def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)


@cli.command()
@click.option("--once", is_flag=True, help="One pass (reap, claim, enqueue), print it, exit.")
@click.option("--rq-redis-url", envvar="CLAWQ_RQ_REDIS_URL", default=None,
              help="Redis for RQ's queue, if not clawq's own (env CLAWQ_RQ_REDIS_URL).")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              default="INFO", show_default=True)
@command_options
def dispatch(obj: Ctx, once: bool, rq_redis_url: str | None, log_level: str) -> None:
    """Claim tasks the moment they may run and hand each to an RQ worker (until SIGTERM)."""
    from clawq.broker.connection import rq_connection
    from clawq.workers.dispatcher import Dispatcher
    from clawq.workers.rq_glue import rq_enqueuer

    _setup_logging(log_level)
    if once:
        b = obj.broker()
        jobs = rq_enqueuer(b, rq_connection(rq_redis_url or obj.redis_url))
        d = Dispatcher(b, jobs, jobs=jobs)
        requeued_and_claimed = d.step()
        emit(obj, {"claimed": requeued_and_claimed, "skip_reasons": d.last_skips},
             f"claimed {requeued_and_claimed} task(s)")
        return
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    found = obj.daemon_broker("dispatch", stop)
    if found is None:
        return
    _warn_if_evicting(found, "dispatch")
    jobs = rq_enqueuer(found, rq_connection(rq_redis_url or obj.redis_url))
    d = Dispatcher(found, jobs, jobs=jobs)  # it also gives back a run whose job was deleted before it ran
    logging.getLogger("clawq.dispatch").info("dispatching namespace %s", found.namespace)
    d.run(stop)


@cli.command()
@click.option("--burst", is_flag=True, help="Exit when the queue is empty.")
@click.option("--name", default=None, help="Worker name (RQ).")
@click.option("--simple", is_flag=True, help="Run jobs in the worker process (no fork per job).")
@click.option("--queue", default=None, help="RQ queue (default: agent.queue from the config).")
@click.option("--rq-redis-url", envvar="CLAWQ_RQ_REDIS_URL", default=None,
              help="Redis for RQ's queue, if not clawq's own (env CLAWQ_RQ_REDIS_URL).")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              default="INFO", show_default=True)
@command_options
def worker(obj: Ctx, burst: bool, name: str | None, simple: bool, queue: str | None,
           rq_redis_url: str | None, log_level: str) -> None:
    """Run an RQ worker that runs agents for claimed tasks (heartbeats, outcome, report)."""
    from clawq.workers.rq_glue import run_worker

    _setup_logging(log_level)
    b = obj.daemon_broker("worker")
    assert b is not None  # no stop event: it waits until Redis answers
    _warn_if_evicting(b, "worker")
    queue_name = queue or b.config().agent.queue
    run_worker(obj.redis_url, queue_name, rq_url=rq_redis_url, burst=burst, name=name,
               simple=simple)


@cli.command()
@click.option("--tasks", type=click.IntRange(min=2, max=10_000), default=40, show_default=True)
@click.option("--boards", type=click.IntRange(min=1, max=1000), default=6, show_default=True)
@click.option("--seed", type=int, default=7, show_default=True, help="Decides the plan: follow-ups, faults.")
@click.option("--speed", type=click.FloatRange(min=0.1, max=10_000), default=6.0, show_default=True,
              help="Simulated minutes per real second.")
@click.option("--workers", type=click.IntRange(min=1, max=64), default=None, help="RQ workers (default boards+1).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write the JSON report here.")
@click.option("--redis-url", "sim_redis_url", default=None,
              help="Use this Redis (a fresh namespace) instead of an embedded one. CLAWQ_REDIS_URL is ignored.")
@click.option("--time-limit", type=click.FloatRange(min=5), default=300.0, show_default=True, help="Seconds.")
@click.option("--no-kill", is_flag=True, help="Do not SIGKILL a worker mid-run.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report on stdout.")
def simulate(tasks: int, boards: int, seed: int, speed: float, workers: int | None, report_path: str | None,
             sim_redis_url: str | None, time_limit: float, no_kill: bool, as_json: bool) -> None:
    """Run a simulated multi-board night (real dispatcher and RQ workers) and check every rule."""
    from pathlib import Path

    from rich.console import Console

    from clawq.sim.simulator import SimOptions, run_simulation
    from clawq.workers.views import LiveView, print_report

    console = Console(stderr=as_json)
    opts = SimOptions(tasks=tasks, boards=boards, seed=seed, speed=speed, workers=workers,
                      redis_url=sim_redis_url, time_limit_s=time_limit, kill_worker=not no_kill)
    view = LiveView(console)
    # SIGTERM stops it as Ctrl-C does: the simulation cleans up (processes, embedded Redis, temp folders)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        report = run_simulation(opts, lambda: view)
    finally:
        view.close()
    if report_path:
        Path(report_path).write_text(json.dumps(report, indent=2, default=str))
    if as_json:
        click.echo(json.dumps(report, default=str))
    else:
        print_report(console, report)
    if not report["ok"]:
        sys.exit(1)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@cli.command()
@click.option("--repair", is_flag=True, help="Rebuild the derived state from the task hashes and queues.")
@command_options
def doctor(obj: Ctx, repair: bool) -> None:
    """Check every queue invariant; --repair rebuilds counters, indexes and refs. Exit 1 if problems remain."""
    doc = obj.broker().doctor(repair=repair)
    lines = [f"note: {n}" for n in doc.get("notes", [])]
    lines += [f"problem: {p}" for p in doc["problems"]]
    lines += [f"repaired: {f}" for f in doc["repaired"]]
    if repair:
        lines += [f"remaining: {p}" for p in doc["remaining"]]
    lines.append("ok" if doc["ok"] else f"{len(doc['remaining'])} problem(s)"
                 + ("" if repair else "; run `clawq doctor --repair`"))
    emit(obj, doc, "\n".join(lines))
    if not doc["ok"]:
        sys.exit(1)


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _first_error(err: ValueError) -> str:
    text = str(err).splitlines()
    detail = [ln.strip() for ln in text[1:] if ln.strip() and not ln.strip().startswith("For further")]
    return (detail[-1] if detail else text[0]).removeprefix("Value error, ")


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning every error into one line and its exit code."""
    args = sys.argv[1:] if argv is None else argv
    as_json = "--json" in args
    try:
        code = cli.main(args=args, prog_name="clawq", standalone_mode=False)
    except click.exceptions.Abort:
        _fail(as_json, "interrupted", 130)
    except click.ClickException as err:
        _fail(as_json, err.format_message().replace("\n", " "), EXIT_BAD_INPUT)
    except ClawqError as err:
        _fail(as_json, str(err), err.exit_code)
    except KeyboardInterrupt:
        _fail(as_json, "interrupted", 130)
    except Exception as err:  # a bug: still one line, never a traceback
        _fail(as_json, f"internal error: {type(err).__name__}: {' '.join(str(err).split())}", 1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
