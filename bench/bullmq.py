"""bullmq: clawq against BullMQ, the best-known Lua-based Redis queue, on one private redis-server, side by side.

Per round, on the same server and in the same minutes, interleaved:

- **cycle**: N times add a job, then run it to its end at concurrency 1. BullMQ: ``Queue.add`` N times, then a
  ``Worker`` runs the N no-op jobs (its ``moveToFinished`` also fetches the next job, so ``moveToActive`` is
  priced in a third phase, where an idle Worker wakes for each job added one at a time). clawq: ``Broker.add``
  N times, then N x (``claim`` + ``complete``). The
  server µs are the sum of the durations of every top-level command the server ran in the phase (SLOWLOG
  with threshold 0, the harness's own commands left out); the calls are the ``redis.call``s that the scripts
  made (SLOWLOG logs them too, just before the script that made them). Also per script: claim ÷ moveToActive
  and complete ÷ moveToFinished.
- **throughput**: N jobs queued beforehand, then timed until all N are done. BullMQ: one Node process, a Worker
  at concurrency 8. clawq: one Python process, batch claims (``Broker.claim_many``) and batched completes
  (``Broker.complete_many``), in a loop run by 2 threads, each with its own Broker and connection: while one
  thread's batch is on the server, the other turns its reply into the next call, as a Worker's concurrent jobs
  overlap its round trips (the goal's figure). The same loop in one thread is reported beside it.

BullMQ (pinned below) is installed with the system ``npm`` into a cache folder on first use; without
``node``/``npm`` the benchmark says so and skips the comparison.

    python -m bench.bullmq [--quick] [--rounds N] [--json FILE] [--no-install]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from clawq.broker import Broker, NothingToClaim, Outcome
from clawq.broker.scripts import load_specs

from ._clawq import bench_config, load_tasks, new_broker
from ._common import Goal, bench_args, cmdstats, median, print_table, write_report
from ._server import BenchServer, machine_info

BULLMQ_VERSION = "6.7.6"
IOREDIS_VERSION = "5.11.1"
DRIVER = Path(__file__).resolve().parent / "bullmq" / "driver.cjs"
HARNESS_NAME = "clawq-bench-harness"
BOARDS = 10
THROUGHPUT_CONCURRENCY = 8
#: clawq's throughput loop runs in this many threads of one process (the goal's figure); 1 is reported too.
CLAWQ_THREADS = 2
DONE = Outcome(needs_follow_up=False, summary="done")
#: The scripts each side's claim and complete are made of, for the per-script ratios.
PAIRS = (("claim_task", "moveToActive"), ("complete_run", "moveToFinished"), ("add_task", "addStandardJob"))


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "clawq-bench" / f"bullmq-{BULLMQ_VERSION}-ioredis-{IOREDIS_VERSION}"


def install_bullmq(*, install: bool = True) -> tuple[Path | None, str]:
    """The pinned BullMQ's node_modules (installed on first use), or None and why not."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        return None, "node/npm not on PATH: the BullMQ comparison is skipped"
    modules = cache_dir() / "node_modules"
    if not (modules / "bullmq" / "package.json").is_file():
        if not install:
            return None, f"bullmq {BULLMQ_VERSION} is not installed in {cache_dir()} and --no-install was given"
        cmd = [npm, "install", "--prefix", str(cache_dir()), "--no-audit", "--no-fund", "--no-save",
               f"bullmq@{BULLMQ_VERSION}", f"ioredis@{IOREDIS_VERSION}"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0:
            return None, f"npm install bullmq@{BULLMQ_VERSION} failed: {done.stderr.strip()[-300:]}"
    return modules, f"bullmq {BULLMQ_VERSION}, ioredis {IOREDIS_VERSION}, node {_node_version(node)}"


def _node_version(node: str) -> str:
    return subprocess.run([node, "--version"], capture_output=True, text=True, check=False).stdout.strip()


# --- measuring a phase ------------------------------------------------------------------------------------------

_SCRIPT_CMDS = frozenset({"evalsha", "evalsha_ro", "eval", "eval_ro"})
_HARNESS_CMDS = frozenset({"config|resetstat", "config|set", "slowlog|reset", "slowlog|get", "info"})


@dataclass
class Phase:
    """What the server ran in one phase.

    From SLOWLOG (threshold 0): top-level commands by name, the calls scripts made, per script (by name) its calls,
    µs and inner calls. From INFO commandstats, in a second pass of the same phase with SLOWLOG off (logging every
    command costs the server time too): the phase's server µs.
    """

    usec: float = 0.0
    commands: int = 0
    inner_calls: int = 0
    top: dict[str, int] = field(default_factory=dict)  #: top-level command -> calls
    inner: dict[str, int] = field(default_factory=dict)  #: command a script ran -> calls
    scripts: dict[str, list[int]] = field(default_factory=dict)  #: name -> [calls, usec, inner calls]

    def per(self, name: str) -> tuple[float, float]:
        calls, usec, inner = self.scripts.get(name, [0, 0, 0])
        return usec / max(1, calls), inner / max(1, calls)

    def price(self, stats: dict[str, tuple[int, int]]) -> None:
        """Server µs of the top-level commands: a script's own; a plain command's, in the share run top-level."""
        total = 0.0
        for cmd, (_, usec) in stats.items():
            if cmd in _HARNESS_CMDS:
                continue
            if cmd in _SCRIPT_CMDS:
                total += usec
            elif self.top.get(cmd):
                total += usec * self.top[cmd] / (self.top[cmd] + self.inner.get(cmd, 0))
        self.usec = total


def _arm(client: redis.Redis, slowlog: bool) -> None:
    client.config_set("slowlog-log-slower-than", 0 if slowlog else -1)
    client.config_set("slowlog-max-len", 2_000_000)
    client.slowlog_reset()
    client.config_resetstat()


def _read_phase(client: redis.Redis, names: dict[str, str]) -> Phase:
    entries = client.execute_command("SLOWLOG", "GET", -1)
    phase, pending = Phase(), 0
    for entry in reversed(entries):  # oldest first
        usec, args, name = int(entry[2]), entry[3], _text(entry[5]) if len(entry) > 5 else ""
        cmd = _command(args)
        if name == HARNESS_NAME:
            continue
        if _text(entry[4]).startswith("?"):  # a command a script ran: it is logged just before its script
            pending += 1
            phase.inner[cmd] = phase.inner.get(cmd, 0) + 1
            continue
        phase.commands += 1
        phase.inner_calls += pending
        phase.top[cmd] = phase.top.get(cmd, 0) + 1
        if cmd in _SCRIPT_CMDS and len(args) > 1:
            acc = phase.scripts.setdefault(names.get(_text(args[1]), _text(args[1])[:8]), [0, 0, 0])
            acc[0], acc[1], acc[2] = acc[0] + 1, acc[1] + usec, acc[2] + pending
        pending = 0
    return phase


def _command(args: list[Any]) -> str:
    cmd = _text(args[0]).lower()
    if cmd in ("config", "slowlog", "client", "script", "cluster", "object", "memory") and len(args) > 1:
        return f"{cmd}|{_text(args[1]).lower()}"
    return cmd


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def measure_twice(client: redis.Redis, names: dict[str, str], run: Callable[[], None]) -> Phase:
    """Run the phase with SLOWLOG on (what ran), then again with it off (what it cost)."""
    _arm(client, slowlog=True)
    run()
    phase = _read_phase(client, names)
    _arm(client, slowlog=False)
    run()
    phase.price(cmdstats(client))
    return phase


# --- the BullMQ side ----------------------------------------------------------------------------------------------


class BullDriver:
    """One Node process running driver.cjs; ``step()`` lets it run its next phase and returns its report."""

    def __init__(self, modules: Path, port: int, mode: str, n: int, concurrency: int) -> None:
        env = {**os.environ, "NODE_PATH": str(modules)}
        self.proc = subprocess.Popen(["node", str(DRIVER), str(port), mode, str(n), str(concurrency)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.shas: dict[str, str] = self._read()["shas"]

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the BullMQ driver exited ({self.proc.wait()})")
        doc: dict[str, Any] = json.loads(line)
        if doc.get("event") == "error":
            raise RuntimeError(f"the BullMQ driver failed: {doc.get('message')}")
        return doc

    def step(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def bull_cycle(srv: BenchServer, modules: Path, n: int) -> list[Phase]:
    """added, processed, trickled: each run twice by the driver (SLOWLOG on, then off)."""
    client = srv.client(client_name=HARNESS_NAME)
    client.flushall()
    driver = BullDriver(modules, srv.port, "cycle", n, 1)
    phases: list[Phase] = []
    try:
        for slowlog in (True, False):
            for i in range(3):
                _arm(client, slowlog)
                driver.step()
                if slowlog:
                    phases.append(_read_phase(client, driver.shas))
                else:
                    phases[i].price(cmdstats(client))
    finally:
        driver.close()
    return phases


def bull_throughput(srv: BenchServer, modules: Path, n: int) -> float:
    srv.client().flushall()
    driver = BullDriver(modules, srv.port, "throughput", n, THROUGHPUT_CONCURRENCY)
    try:
        driver.step()  # added (not timed)
        seconds = float(driver.step()["seconds"])
    finally:
        driver.close()
    return n / seconds


# --- the clawq side -------------------------------------------------------------------------------------------------


def _clawq(srv: BenchServer, namespace: str) -> tuple[Broker, dict[str, str]]:
    srv.client().flushall()
    broker = new_broker(srv.client(), namespace, bench_config(), cool=False)
    names = {str(broker.client.script_load(s.source)): name for name, s in load_specs().items()}
    return broker, names


def clawq_cycle(srv: BenchServer, n: int) -> list[Phase]:
    """added, processed (claim + complete at concurrency 1), each run twice (SLOWLOG on, then off)."""
    broker, names = _clawq(srv, "cycle")
    client = srv.client(client_name=HARNESS_NAME)

    def add() -> None:
        for i in range(n):
            broker.add(f"b{i % BOARDS}", "t", chain="coding")

    def run() -> None:
        for _ in range(n):
            claim = broker.claim()
            broker.complete(claim.task_id, claim.run_id, DONE)

    return [measure_twice(client, names, add), measure_twice(client, names, run)]


def clawq_throughput(srv: BenchServer, n: int, boards: int, threads: int = 1) -> float:
    """Tasks per second through claim_many(64) and complete_many, ``threads`` loops in this process, each with its
    own Broker and connection, until all ``n`` tasks (queued beforehand, not timed) are done."""
    broker, _ = _clawq(srv, "tput")
    load_tasks(broker, ((f"b{i % boards}", "coding", "") for i in range(n)))
    brokers = [broker] + [Broker(srv.client(), "tput") for _ in range(threads - 1)]
    for b in brokers[1:]:
        b.connect()
    loop = _Loop(n, threads)
    start = time.perf_counter()
    if threads == 1:
        loop.run(broker)
    else:
        workers = [threading.Thread(target=loop.run, args=(b,)) for b in brokers]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    seconds = time.perf_counter() - start
    if loop.errors:
        raise loop.errors[0]
    return n / seconds


class _Loop:
    """clawq's throughput loop, shared by its threads: claim_many(64), then complete_many of the claims."""

    def __init__(self, n: int, threads: int) -> None:
        self.n, self.threads, self.done = n, threads, 0
        self.lock = threading.Lock()
        self.errors: list[BaseException] = []
        self.deadline = time.monotonic() + 600

    def run(self, broker: Broker) -> None:
        try:
            while self.done < self.n:
                try:
                    claims, _ = broker.claim_many(64)
                except NothingToClaim:
                    if self.threads == 1 or time.monotonic() > self.deadline:
                        raise
                    time.sleep(0)  # every ready board is in the other thread's batch: its complete frees them
                    continue
                complete_many(broker, claims)
                with self.lock:
                    self.done += len(claims)
        except BaseException as exc:  # the caller raises it
            self.errors.append(exc)


def complete_many(broker: Broker, claims: list[Any]) -> None:
    many: Callable[..., Any] | None = getattr(broker, "complete_many", None)
    if many is not None:
        many([(c.task_id, c.run_id, DONE) for c in claims])
        return
    for c in claims:
        broker.complete(c.task_id, c.run_id, DONE)


# --- the run ----------------------------------------------------------------------------------------------------------


def _round(srv: BenchServer, modules: Path, n: int, n_tput: int) -> dict[str, Any]:
    b_add, b_run, b_trickle = bull_cycle(srv, modules, n)
    c_add, c_run = clawq_cycle(srv, n)
    row: dict[str, Any] = {
        "bull_cycle_us": (b_add.usec + b_run.usec) / n, "clawq_cycle_us": (c_add.usec + c_run.usec) / n,
        "bull_calls": (b_add.inner_calls + b_run.inner_calls) / n,
        "clawq_calls": (c_add.inner_calls + c_run.inner_calls) / n,
        "bull_commands": (b_add.commands + b_run.commands) / n,
        "clawq_commands": (c_add.commands + c_run.commands) / n,
    }
    for ours, theirs in PAIRS:
        mine = (c_add if ours == "add_task" else c_run).per(ours)
        other = {"addStandardJob": b_add, "moveToActive": b_trickle}.get(theirs, b_run).per(theirs)
        row[f"{ours}_us"], row[f"{ours}_calls"] = mine
        row[f"{theirs}_us"], row[f"{theirs}_calls"] = other
    row["bull_jobs_per_s"] = bull_throughput(srv, modules, n_tput)
    row["clawq_tasks_per_s"] = clawq_throughput(srv, n_tput, boards=max(64, n_tput // 20), threads=CLAWQ_THREADS)
    row["clawq_tasks_per_s_1_thread"] = clawq_throughput(srv, n_tput, boards=max(64, n_tput // 20))
    return row


def main() -> int:
    args = bench_args(__doc__.split("\n\n")[0] if __doc__ else "bullmq", _extra)
    rounds = args.rounds or (3 if args.quick else 5)
    n, n_tput = (200, 2000) if args.quick else (1000, 10_000)
    modules, versions = install_bullmq(install=not args.no_install)
    if modules is None:
        print(f"bullmq: {versions}")
        write_report("bullmq", args, {"skipped": versions}, [], {"skipped": versions})
        return 0
    with BenchServer() as srv:
        info = machine_info(srv.version) | {"anchor": versions}
        rows = [_round(srv, modules, n, n_tput) for _ in range(rounds)]
    med = {k: median([float(r[k]) for r in rows]) for k in rows[0]}
    goals = [
        Goal("clawq cycle ÷ BullMQ job cycle, server µs", med["clawq_cycle_us"] / med["bull_cycle_us"], 1.0, "x"),
        Goal("BullMQ jobs/s ÷ clawq tasks/s, one process each", med["bull_jobs_per_s"] / med["clawq_tasks_per_s"],
             1.0, "x"),
    ]
    _print(med, goals, versions, rounds, n)
    write_report("bullmq", args, info, goals, {"median": med, "rounds": rows, "anchor": versions})
    return 0


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-install", action="store_true", help="skip the comparison if BullMQ is not cached")


def _print(med: dict[str, float], goals: list[Goal], versions: str, rounds: int, n: int) -> None:
    print(f"anchor: {versions}; median of {rounds} interleaved rounds, {n} cycles each")
    print_table("one cycle (add + claim + complete vs add + moveToActive + moveToFinished)",
                ["", "clawq", "BullMQ", "ratio"], [
                    ["server µs per cycle", med["clawq_cycle_us"], med["bull_cycle_us"],
                     med["clawq_cycle_us"] / med["bull_cycle_us"]],
                    ["redis.calls per cycle", med["clawq_calls"], med["bull_calls"],
                     med["clawq_calls"] / max(1e-9, med["bull_calls"])],
                    ["top-level commands per cycle", med["clawq_commands"], med["bull_commands"],
                     med["clawq_commands"] / max(1e-9, med["bull_commands"])],
                ])
    print_table("per script (µs per call, redis.calls per call)", ["clawq", "µs", "calls", "BullMQ", "µs", "calls",
                                                                     "µs ratio"],
                [[o, med[f"{o}_us"], med[f"{o}_calls"], t, med[f"{t}_us"], med[f"{t}_calls"],
                  med[f"{o}_us"] / max(1e-9, med[f"{t}_us"])] for o, t in PAIRS])
    print_table("throughput, one process each", ["", "per second"], [
        [f"clawq tasks/s (batch claims, batched completes, {CLAWQ_THREADS} threads)", med["clawq_tasks_per_s"]],
        ["clawq tasks/s (the same loop, 1 thread)", med["clawq_tasks_per_s_1_thread"]],
        [f"BullMQ jobs/s (Worker, concurrency {THROUGHPUT_CONCURRENCY})", med["bull_jobs_per_s"]],
    ])
    for g in goals:
        print(f"goal: {g.name} = {g.measured:.2f} (limit {g.limit}) -> {'met' if g.met else 'MISSED'}")


if __name__ == "__main__":
    raise SystemExit(main())
