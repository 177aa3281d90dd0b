"""Agent runners: run the agent for one claimed task and say what it produced.

- ``command``: ``agent.command`` is an argv list, run without a shell, in its own session; every process it
  starts is killed when the run ends, also one that left its session (:mod:`workers.procs`). The task
  goes to stdin as JSON; the last non-empty stdout line is the outcome (see :mod:`clawq.workers.agent_output`).
- ``python``: ``agent.callable = "module:function"``, called with the task document; returns an outcome
  document (or an :class:`~broker.Outcome`). On the main thread it runs under a SIGALRM tick, so it must
  leave SIGALRM alone (as under RQ, whose job timeout is that signal too).
- ``simulated``: the deterministic fake agent of the simulation (:mod:`sim.agent`). It lives in the ``sim``
  package above this one, so it is looked up by import path, and only when the config names it.

A runner returns ``None`` when it was stopped because the run lost its lease: nothing must be reported.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import selectors
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from clawq.broker import Outcome
from clawq.broker.config import AgentConfig, AgentEntry, Config

from .agent_output import AgentResult, Done, Failed, classify_text, outcome_meta, parse_agent_output, result_from_doc
from .agents import PRESETS, Adapter, Invocation, Usage, interpret, render_prompt, render_resume
from .procs import AgentTree, die_with_parent

__all__ = ["SECRET_ENV_PREFIXES", "STOP_GRACE_S", "RunContext", "Stalled", "agent_env", "preload_agent", "run_agent",
           "run_model", "stop_agent"]

#: Environment variables never passed on to an agent (nor, by inheritance, to the simulation's processes):
#: clawq's own settings and Redis credentials.
SECRET_ENV_PREFIXES = ("CLAWQ_", "REDIS_", "RQ_")
#: Runners that live outside this package, by ``agent.runner``: ``module:function`` taking (AgentConfig,
#: RunContext). Imported when first used, so the production worker never imports the simulation otherwise.
_RUNNERS_BY_PATH = {"simulated": "clawq.sim.agent:run_simulated"}
_OUTPUT_CAP = 4 * 1024 * 1024
_POLL_S = 0.05
#: How often a running agent's process tree is noted (cheap: one read of /proc).
_SCAN_S = 0.5
#: How long, after the agent exited, its output may keep coming before the rest of its tree is killed.
_LINGER_S = 1.0
#: How long a stopped agent gets, in all, to exit on its clean-stop signals before SIGKILL (at most 10 s).
STOP_GRACE_S = 8.0


class Stalled(Exception):
    """The agent hangs: the job stops heart-beating and reports nothing (the simulated agent's stall)."""


@dataclass
class RunContext:
    """What a runner gets: the task document, the limits, and the stop signal."""

    task: dict[str, Any]
    timeout_s: float
    stop: threading.Event = field(default_factory=threading.Event)
    log: list[str] = field(default_factory=list)  #: the agent's own log lines (tail kept in history)
    #: called once the agent has outlived its first poll (the job starts its heartbeats then: the lease was just
    #: extended, and an agent that ends at once never needs a heartbeat thread)
    on_start: Callable[[], None] | None = None
    cwd: str | None = None  #: the board's workdir (None: the worker's own cwd)
    env: dict[str, str] = field(default_factory=dict)  #: on top of agent_env: board env, agent env, env_from
    #: what the run said about itself, for its history: session_id, usage {input_tokens, output_tokens, cost_usd}
    meta: dict[str, Any] = field(default_factory=dict)
    _started: bool = False

    def started(self) -> None:
        if self.on_start is not None and not self._started:
            self._started = True
            self.on_start()


def agent_env(task: dict[str, Any], base: dict[str, str] | None = None) -> dict[str, str]:
    """The agent's environment: the worker's own, minus clawq's settings and credentials, plus the task."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith(SECRET_ENV_PREFIXES)}
    env.update({
        "CLAWQ_TASK_ID": str(task["task_id"]),
        "CLAWQ_RUN_ID": str(task["run_id"]),
        "CLAWQ_MODEL": str(task["model"]),
        "CLAWQ_PROVIDER": str(task["provider"]),
        "CLAWQ_BOARD": str(task["board"]),
        "CLAWQ_RUN_COUNT": str(task["run_count"]),
    })
    return env


class _Pipes:
    """The agent's stdin, stdout and stderr, served from the runner's own loop, never blocking: a process that
    outlives the agent and holds its pipes can delay nothing."""

    def __init__(self, proc: subprocess.Popen[bytes], data: bytes) -> None:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        self.out, self.err = bytearray(), bytearray()
        self._files = [proc.stdin, proc.stdout, proc.stderr]
        self._todo = memoryview(data)
        self._sel = selectors.DefaultSelector()
        for stream, sink in ((proc.stdout, self.out), (proc.stderr, self.err)):
            os.set_blocking(stream.fileno(), False)
            self._sel.register(stream.fileno(), selectors.EVENT_READ, sink)
        os.set_blocking(proc.stdin.fileno(), False)
        self._sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE, None)

    @property
    def reading(self) -> bool:
        return any(key.data is not None for key in self._sel.get_map().values())

    def pump(self, timeout: float) -> bool:
        """Move what is ready (waiting up to ``timeout``); True when something was read."""
        got = False
        for key, _ in self._sel.select(timeout):
            if key.data is None:
                self._write(key.fd)
            else:
                got = self._read(key.fd, key.data) or got
        return got

    def _read(self, fd: int, sink: bytearray) -> bool:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return False
        except OSError:
            chunk = b""
        if not chunk:
            self._sel.unregister(fd)
            return False
        sink.extend(chunk)
        if len(sink) > 2 * _OUTPUT_CAP:  # keep only the tail
            del sink[: len(sink) - _OUTPUT_CAP]
        return True

    def _write(self, fd: int) -> None:
        """Feed the task to stdin; an agent that never reads it is its own business (the rest is dropped)."""
        try:
            sent = os.write(fd, self._todo[:65536])
        except BlockingIOError:
            return
        except OSError:
            sent = len(self._todo)
        self._todo = self._todo[sent:]
        if not self._todo:
            self._sel.unregister(fd)
            self._files[0].close()

    def drain(self, limit_s: float) -> None:
        """Read on while output keeps coming (at most ``limit_s``); stop at end of file or the first quiet spell."""
        end = time.monotonic() + limit_s
        while self.reading and time.monotonic() < end and self.pump(_POLL_S):
            pass

    def close(self) -> None:
        self._sel.close()
        for stream in self._files:
            with contextlib.suppress(OSError):
                stream.close()


def _start(argv: list[str], ctx: RunContext, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
        env={**agent_env(ctx.task), **ctx.env, **(env or {})}, cwd=ctx.cwd, start_new_session=True,
        preexec_fn=die_with_parent,  # a killed worker leaves no agent behind
    )


def stop_agent(tree: AgentTree, first: signal.Signals | tuple[signal.Signals, ...] | None = None,
               grace_s: float = 0.0) -> None:
    """The one way a run's processes end (timeout, fencing, or after the agent exited): every process of its
    tree, also those that left its group or session, is killed (see :mod:`workers.procs`). ``first``: the
    CLI's clean-stop signals, sent in turn to its group (Codex wants SIGINT, then SIGTERM), each with its share
    of ``grace_s`` for the leader to exit, before SIGKILL."""
    signals = (first,) if isinstance(first, signal.Signals) else tuple(first or ())
    share = grace_s / max(1, len(signals))
    for sig in signals[:-1]:
        if tree.leader is None or tree.leader not in tree.alive():
            break
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(tree.leader, sig)
        end = time.monotonic() + share
        while time.monotonic() < end and tree.leader in tree.alive():
            time.sleep(_POLL_S)
    tree.stop(signals[-1] if signals else None, share)


def _wait(proc: subprocess.Popen[bytes], pipes: _Pipes, tree: AgentTree, ctx: RunContext) -> str | None:
    """Serve the agent's pipes until it exits; returns "stopped" or "timeout" when it had to be killed."""
    deadline = time.monotonic() + ctx.timeout_s
    next_scan = time.monotonic() + _SCAN_S
    while True:
        if pipes.reading:
            pipes.pump(_POLL_S)
        with contextlib.suppress(subprocess.TimeoutExpired):  # returns as soon as the agent exits
            proc.wait(timeout=0 if pipes.reading else _POLL_S)
            return None
        ctx.started()
        if ctx.stop.is_set():
            return "stopped"
        if time.monotonic() > deadline:
            return "timeout"
        if time.monotonic() >= next_scan:  # note the processes it starts, in case they leave its group
            tree.scan()
            next_scan = time.monotonic() + _SCAN_S


def _expect(ctx: RunContext) -> tuple[int, str]:
    return int(ctx.task["task_id"]), str(ctx.task["run_id"])


def _run_tree(argv: list[str], ctx: RunContext, data: bytes | None = None, env: dict[str, str] | None = None,
              signals: tuple[signal.Signals, ...] = ()) -> tuple[str | None, subprocess.Popen[bytes], _Pipes]:
    """Start the agent, serve it until it ends, and leave none of its processes behind. ``data`` goes to its
    stdin (default: the task as JSON); ``signals`` stop it cleanly when it must be stopped."""
    tree = AgentTree(marker=f"CLAWQ_RUN_ID={ctx.task['run_id']}")
    proc = _start(argv, ctx, env)
    tree.lead(proc.pid)
    pipes = _Pipes(proc, json.dumps(ctx.task).encode() if data is None else data)
    ended: str | None = "stopped"
    try:
        ended = _wait(proc, pipes, tree, ctx)
        if ended is None:  # what the agent wrote before it exited is in the pipes; a daemon may write on: no wait
            pipes.drain(_LINGER_S)
    finally:
        stop_agent(tree, signals if ended else None, STOP_GRACE_S if ended and signals else 0.0)
        proc.wait()
        pipes.drain(_LINGER_S)  # every writer is dead now: the rest up to end of file comes at once
        pipes.close()
    return ended, proc, pipes


def run_command(argv: list[str], ctx: RunContext) -> AgentResult | None:
    """Run a command agent (no shell, own session) and read its outcome."""
    try:
        ended, proc, pipes = _run_tree(argv, ctx)
    except OSError as err:
        return Failed(error=f"cannot start agent {argv[0]!r}: {err}", cause="agent_unreachable")
    stdout, stderr = pipes.out.decode("utf-8", "replace"), pipes.err.decode("utf-8", "replace")
    ctx.log.extend(_tail_lines(stdout.splitlines()[:-1] + stderr.splitlines()))
    ctx.meta.update(outcome_meta(stdout))
    if ended == "stopped":
        return None
    if ended == "timeout":
        return Failed(error=f"agent killed after {ctx.timeout_s:.0f}s", cause="timeout")
    return parse_agent_output(stdout, stderr, proc.returncode, time.time(), _expect(ctx))


def _tail_lines(lines: Iterable[str], limit: int = 200) -> list[str]:
    kept = [ln for ln in lines if ln.strip()]
    return kept[-limit:]


def _import(spec: str) -> Callable[..., Any]:
    module, _, name = spec.partition(":")
    fn = getattr(importlib.import_module(module), name)
    if not callable(fn):
        raise TypeError(f"{spec} is not callable")
    return fn  # type: ignore[no-any-return]


def run_python(spec: str, ctx: RunContext) -> AgentResult | None:
    """Call a python agent, bounded by the timeout; ``None`` when stopped (its result, if any, is dropped).

    On the main thread (an RQ work-horse, a SimpleWorker) the agent runs on that thread under a timer signal
    (:func:`_run_python_here`), as RQ runs any job under its own SIGALRM timeout; elsewhere it runs in a
    thread of its own (:func:`_run_python_in_thread`)."""
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        return _run_python_here(spec, ctx)
    return _run_python_in_thread(spec, ctx)


class _Interrupted(BaseException):
    """Raised into a python agent by its timer: it was stopped, or it ran out of time. A BaseException, so an
    agent's ``except Exception`` does not swallow it; it is raised again at every tick until the agent ends."""


#: How often the timer of a python agent on the main thread looks at its stop signal and its deadline.
_TICK_S = 0.05
#: threading's own locks, which a new thread takes as it starts: a tick that interrupted the agent while it
#: held one of them does not start the heartbeat then (the start would wait for itself), but at a later tick.
#: Looked up at each tick: a fork makes new ones.
_THREAD_START_LOCKS = ("_active_limbo_lock", "_shutdown_locks_lock")


def _thread_start_would_wait_for_us() -> bool:
    for name in _THREAD_START_LOCKS:
        lock = getattr(threading, name, None)
        owned = getattr(lock, "_is_owned", None)  # an RLock: held by this thread?
        if lock is not None and (owned() if owned is not None else lock.locked()):
            return True
    return False


class _Ticks:
    """The SIGALRM handler of a python agent on the main thread: starts its heartbeats once, and interrupts it
    when ``ctx.stop`` is set or the deadline passed (again at every tick, until the agent ends)."""

    def __init__(self, ctx: RunContext, deadline: float) -> None:
        self.ctx, self.deadline = ctx, deadline
        self.why: str | None = None  #: "stopped" or "timeout", once the agent was interrupted
        self.running = True

    def __call__(self, signum: int, frame: Any) -> None:
        if not self.running:
            return
        if self.why is None:
            if self.ctx.stop.is_set():
                self.why = "stopped"
            elif time.monotonic() > self.deadline:
                self.why = "timeout"
            else:
                if not _thread_start_would_wait_for_us():
                    self.ctx.started()
                return
        raise _Interrupted(self.why)


def _run_python_here(spec: str, ctx: RunContext) -> AgentResult | None:
    """Call the agent on this (main) thread, under :class:`_Ticks` every :data:`_TICK_S`. An agent that returns
    before its first tick costs no thread at all: a forked work-horse that starts a thread pays for it in every
    page it copies afterwards. The timer armed before (RQ's job timeout, a test runner's) gets its handler
    back, and its time left, when the agent ends."""
    ticks = _Ticks(ctx, time.monotonic() + ctx.timeout_s)
    value: Any = None
    with _ticking(ticks):
        try:
            try:
                value = _import(spec)(dict(ctx.task))
            finally:
                ticks.running = False
        except _Interrupted:
            pass
        except (Exception, SystemExit) as err:  # the agent's failure is a run failure, not ours
            value = err
    if ticks.why == "stopped":
        return None
    if ticks.why == "timeout":
        return Failed(error=f"agent still running after {ctx.timeout_s:.0f}s", cause="timeout")
    return _python_result(value, _expect(ctx))


@contextlib.contextmanager
def _ticking(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """Call ``handler`` on SIGALRM every :data:`_TICK_S` inside the block; then give the timer back to whoever
    had it (its handler, and what was left of its delay: at least a millisecond, so that one that came due
    meanwhile still fires)."""
    started = time.monotonic()
    before = signal.signal(signal.SIGALRM, handler)
    delay, interval = signal.setitimer(signal.ITIMER_REAL, _TICK_S, _TICK_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)
        if delay > 0:
            signal.setitimer(signal.ITIMER_REAL, max(delay - (time.monotonic() - started), 0.001), interval)


def _run_python_in_thread(spec: str, ctx: RunContext) -> AgentResult | None:
    """Call the agent in a thread; stop abandons it (its result is dropped)."""
    box: list[Any] = []

    def target() -> None:
        try:
            box.append(_import(spec)(dict(ctx.task)))
        except Exception as err:  # the agent's failure is a run failure, not ours
            box.append(err)

    thread = threading.Thread(target=target, daemon=True, name="clawq-python-agent")
    thread.start()
    deadline = time.monotonic() + ctx.timeout_s
    while True:
        thread.join(timeout=_POLL_S)  # returns as soon as the agent returns
        if not thread.is_alive():
            break
        ctx.started()
        if ctx.stop.is_set():
            return None
        if time.monotonic() > deadline:
            return Failed(error=f"agent still running after {ctx.timeout_s:.0f}s", cause="timeout")
    return _python_result(box[0] if box else None, _expect(ctx))


def _python_result(value: Any, expect: tuple[int, str]) -> AgentResult:
    if isinstance(value, BaseException):
        return classify_text(f"{type(value).__name__}: {value}", time.time())
    if isinstance(value, Outcome):
        return Done(value)
    if isinstance(value, Done | Failed) or type(value).__name__ == "RateLimited":
        return value  # type: ignore[no-any-return]
    if isinstance(value, dict):
        return result_from_doc(value, time.time(), expect)
    return Failed(error=f"bad agent output: the callable returned {type(value).__name__}", cause="bad_output")


def preload_agent(agent: AgentConfig) -> None:
    """Import a python agent's module now (in a forking worker: once, before the forks), if it imports; a
    failing import is reported by the run that calls it."""
    spec = agent.callable if agent.runner == "python" else _RUNNERS_BY_PATH.get(agent.runner)
    if spec:
        with contextlib.suppress(Exception):
            importlib.import_module(spec.partition(":")[0])


def run_agent(agent: AgentConfig, ctx: RunContext) -> AgentResult | None:
    """Run the configured agent for ``ctx.task``; ``None`` when stopped (lease lost)."""
    if agent.runner == "command":
        if not agent.command:
            return Failed(error="agent.command is not configured", cause="agent_unreachable")
        return run_command(list(agent.command), ctx)
    if agent.runner == "python":
        assert agent.callable is not None
        return run_python(agent.callable, ctx)
    runner: Callable[[AgentConfig, RunContext], AgentResult | None] = _import(_RUNNERS_BY_PATH[agent.runner])
    return runner(agent, ctx)


# -- the CLI presets (agents.<model>) ---------------------------------------------------------------------


def _last_session(task: dict[str, Any], model: str) -> tuple[str | None, str]:
    """The session to resume and the next prompt: when the task's last outcome asked for a follow-up, was made
    on ``model``, and its run said its session id. Else (None, "")."""
    context = task.get("context") or []
    last = context[-1] if context else None
    session = task.get("last_session") or {}
    if not last or not last.get("next_prompt") or last.get("model") != model:
        return None, ""
    if session.get("run_id") != last.get("run_id") or not session.get("session_id"):
        return None, ""
    return str(session["session_id"]), str(last["next_prompt"])


def _template(entry: AgentEntry) -> str | None:
    if entry.prompt_template is None:
        return None
    with open(entry.prompt_template, encoding="utf-8") as fh:
        return fh.read()


def _entry_env(entry: AgentEntry, base: dict[str, str] | None = None) -> dict[str, str]:
    """The entry's env and its env_from copies (read from the worker's environment at run time; a missing
    source raises KeyError naming it)."""
    source = os.environ if base is None else base
    env = dict(entry.env)
    for name, var in entry.env_from.items():
        if var not in source:
            raise KeyError(var)
        env[name] = source[var]
    return env


def _local_zone() -> Any:
    return datetime.now().astimezone().tzinfo


#: What the CLIs say when a session id they are asked to resume is gone (expired, made on another machine):
#: Claude, Codex, Gemini, opencode.
_SESSION_GONE = re.compile(r"no conversation found|no rollout found|invalid session identifier|session not found",
                           re.I)


def run_preset(entry: AgentEntry, model: str, ctx: RunContext) -> AgentResult | None:
    """Run a CLI preset for ``ctx.task``: render the prompt (only the next prompt when the previous run's
    session is resumed), start the CLI in the board's workdir, parse its own output. A session the CLI no
    longer knows is not the task's fault: the run starts afresh with the task's whole context."""
    adapter: Adapter = PRESETS[entry.preset]
    try:
        ctx.env.update(_entry_env(entry))
        template = _template(entry)
    except KeyError as err:
        return Failed(error=f"agents.{model}.env_from: {err.args[0]} is not set in the worker's environment",
                      cause="agent_config")
    except OSError as err:
        return Failed(error=f"agents.{model}.prompt_template: cannot read it: {err}", cause="agent_config")
    session, next_prompt = _last_session(ctx.task, model) if adapter.resumes else (None, "")
    if session:
        began = time.monotonic()
        result = _invoke(entry, adapter, model, ctx, render_resume(next_prompt), session)
        if not (isinstance(result, Failed) and result.cause == "failed" and _SESSION_GONE.search(result.error)):
            return result
        ctx.log.append(f"clawq: session {session} cannot be resumed; starting afresh with the task's context")
        ctx.timeout_s = max(1.0, ctx.timeout_s - (time.monotonic() - began))
    return _invoke(entry, adapter, model, ctx, render_prompt(ctx.task, template), None)


def _invoke(entry: AgentEntry, adapter: Adapter, model: str, ctx: RunContext, prompt: str, session: str | None
            ) -> AgentResult | None:
    """One start of the CLI; its session id and usage (added to an earlier start's) go to ``ctx.meta``."""
    with tempfile.TemporaryDirectory(prefix="clawq-run-") as scratch:
        inv = Invocation(bin=entry.bin or adapter.default_bin, model=entry.model or model, prompt=prompt,
                         session_id=session, cwd=ctx.cwd or os.getcwd(), args=tuple(entry.args),
                         timeout_s=ctx.timeout_s, scratch=scratch, root=os.geteuid() == 0)
        launch = adapter.launch(inv)
        try:
            ended, proc, pipes = _run_tree(launch.argv, ctx, launch.stdin or b"", launch.env, adapter.stop_signals)
        except OSError as err:
            return Failed(error=f"cannot start {inv.bin!r} ({entry.preset}): {err}", cause="agent_config")
    stdout, stderr = pipes.out.decode("utf-8", "replace"), pipes.err.decode("utf-8", "replace")
    ctx.log.extend(_tail_lines(stderr.splitlines() + stdout.splitlines()))
    native = adapter.parse(stdout, stderr, proc.returncode)
    earlier = ctx.meta.get("usage")
    usage = native.usage if earlier is None else Usage(**earlier).plus(native.usage)
    ctx.meta.update(session_id=native.session_id or ctx.meta.get("session_id"), usage=usage.doc())
    if ended == "stopped":
        return None
    if ended == "timeout":
        return Failed(error=f"agent killed after {ctx.timeout_s:.0f}s", cause="timeout")
    return interpret(native, stderr, proc.returncode, time.time(), _local_zone())


def run_model(cfg: Config, ctx: RunContext) -> AgentResult | None:
    """Run the agent of ``ctx.task``'s model in its board's workdir: its ``agents`` preset, else the generic
    ``agent`` runner. The environment gets the board's env, then the entry's env and env_from."""
    model, board = str(ctx.task["model"]), str(ctx.task["board"])
    where = cfg.boards.get(board)
    if where is not None:
        ctx.cwd = where.workdir or ctx.cwd
        ctx.env.update(where.env)
    entry = cfg.agents.get(model)
    if entry is None:
        return run_agent(cfg.agent, ctx)
    if entry.timeout_minutes is not None:
        ctx.timeout_s = entry.timeout_minutes * 60
    return run_preset(entry, model, ctx)
