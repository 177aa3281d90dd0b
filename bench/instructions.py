"""instructions: what a task costs the Redis server, counted in CPU instructions under valgrind's callgrind.

Server µs on a shared machine swing from one day to the next (the same cycle measured 204 µs one night and
647 µs the next on this 2-core VM), and within a run by the load of the other core. Instruction counts do not:
the same scripts and inputs give the same count within about 1 %, whatever else the machine is doing, so one
run tells whether a change made the server's work smaller. Each side runs on its own private redis-server
started under ``valgrind --tool=callgrind``; the counters are zeroed before a phase and dumped after it
(``callgrind_control``), so only the phase's commands are counted (the server's idle loop included, a few
thousand instructions).

- **clawq cycle**: N adds (one board each), N claims, N completes, one call at a time, as the µs cycle of
  ``bench.bullmq``: instructions per add, claim and complete, and per cycle.
- **clawq throughput loop**: ``claim_many(64)`` then ``complete_many`` of the claims, per task.
- **BullMQ cycle** (bullmq installed by ``bench.bullmq``, node on PATH): ``Queue.add`` then a Worker at
  concurrency 1, per job; clawq cycle ÷ BullMQ cycle is issue 16's goal 1 in instructions.

    python -m bench.instructions [--quick] [--json FILE] [--no-install]

The server is the system ``redis-server`` unless ``CLAWQ_BENCH_REDIS`` names another (one built with symbols
lets ``callgrind_annotate`` name the functions in the dumps, which this bench keeps with ``--keep``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clawq.broker import Outcome

from ._clawq import bench_config, load_tasks, new_broker
from ._common import Goal, bench_args, print_table, write_report
from ._server import BenchServer, machine_info
from .bullmq import BullDriver, complete_many, install_bullmq

DONE = Outcome(summary="s")
BATCH = 64


class Counted:
    """A private redis-server under callgrind; :meth:`count` runs a phase and returns its instructions."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        wrapper = ("valgrind", "--tool=callgrind", f"--callgrind-out-file={out_dir}/callgrind.out.%p",
                   "--dump-instr=no")
        self.srv = BenchServer(os.environ.get("CLAWQ_BENCH_REDIS"), ("--slowlog-log-slower-than", "-1"), wrapper)

    def __enter__(self) -> Counted:
        self.srv.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.srv.stop()

    def _control(self, *args: str) -> None:
        subprocess.run(["callgrind_control", *args, str(self.srv.pid)], capture_output=True, check=True,
                       timeout=60)

    def count(self, label: str, phase: Callable[[], Any]) -> int:
        """The server's instructions while ``phase`` runs."""
        self._control("--zero")
        phase()
        before = set(self.out_dir.glob("callgrind.out.*"))
        self._control("--dump=" + label)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for dump in set(self.out_dir.glob("callgrind.out.*")) - before:
                total = _total(dump)
                if total is not None:
                    return total
            time.sleep(0.05)
        raise RuntimeError(f"callgrind wrote no dump for {label}")


def _total(dump: Path) -> int | None:
    """The instruction total a finished callgrind dump records (None while it is being written)."""
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    return None


def clawq_cycle(out_dir: Path, n: int) -> dict[str, float]:
    with Counted(out_dir) as c:
        broker = new_broker(c.srv.client(), "cycle", bench_config(), cool=False)
        for i in range(20):  # warm: every script loaded, the stream and indexes exist
            broker.add(f"w{i}", "t", chain="coding")
            claim = broker.claim()
            broker.complete(claim.task_id, claim.run_id, DONE)
        claims: list[Any] = []
        add = c.count("add", lambda: [broker.add(f"b{i}", "t", chain="coding") for i in range(n)])
        claim = c.count("claim", lambda: claims.extend(broker.claim() for _ in range(n)))
        complete = c.count("complete", lambda: [broker.complete(x.task_id, x.run_id, DONE) for x in claims])
        broker.close()
    return {"add": add / n, "claim": claim / n, "complete": complete / n, "cycle": (add + claim + complete) / n}


def clawq_throughput(out_dir: Path, n: int) -> dict[str, float]:
    with Counted(out_dir) as c:
        broker = new_broker(c.srv.client(), "tput", bench_config(), cool=False)
        load_tasks(broker, ((f"b{i % 200}", "coding", "") for i in range(n + BATCH)))
        claims, _ = broker.claim_many(BATCH)  # warm
        complete_many(broker, claims)
        batch: list[Any] = []

        def claim() -> None:
            batch[:] = broker.claim_many(BATCH)[0]

        claimed = completed = tasks = 0
        while tasks < n:
            claimed += c.count("claim_many", claim)
            completed += c.count("complete_many", lambda: complete_many(broker, batch))
            tasks += len(batch)
        broker.close()
    return {"claim": claimed / tasks, "complete": completed / tasks, "task": (claimed + completed) / tasks}


def bull_cycle(out_dir: Path, modules: Path, n: int) -> dict[str, float]:
    with Counted(out_dir) as c:
        driver = BullDriver(modules, c.srv.port, "cycle", n, 1)
        try:
            add = c.count("bull_add", driver.step)
            run = c.count("bull_run", driver.step)
        finally:
            driver.proc.kill()
            driver.proc.wait()
    return {"add": add / n, "run": run / n, "cycle": (add + run) / n}


def main() -> int:
    args = bench_args(__doc__.split("\n\n")[0] if __doc__ else "instructions", _extra)
    n, n_tput = (30, 128) if args.quick else (300, 1280)
    missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
    if missing:
        why = f"{' and '.join(missing)} not on PATH (Debian package valgrind)"
        print(f"instructions: skipped: {why}")
        write_report("instructions", args, {"skipped": why}, [], {"skipped": why})
        return 0
    modules, versions = install_bullmq(install=not args.no_install)
    out_dir = Path(tempfile.mkdtemp(prefix="clawq-callgrind-"))
    try:
        cycle = clawq_cycle(out_dir, n)
        tput = clawq_throughput(out_dir, n_tput)
        bull = bull_cycle(out_dir, modules, n) if modules is not None else None
        with BenchServer(os.environ.get("CLAWQ_BENCH_REDIS")) as srv:
            info = machine_info(srv.version) | {"anchor": versions}
    finally:
        if args.keep:
            print(f"callgrind dumps kept in {out_dir}")
        else:
            shutil.rmtree(out_dir, ignore_errors=True)
    _print(cycle, tput, bull, versions, n)
    details: dict[str, Any] = {"clawq_cycle": cycle, "clawq_throughput": tput, "bullmq_cycle": bull, "ops": n}
    if bull is None:
        details["skipped"] = f"BullMQ: {versions}"
        write_report("instructions", args, info, [], details)
        return 0
    goals = [Goal("clawq cycle ÷ BullMQ job cycle, server instructions", cycle["cycle"] / bull["cycle"], 1.0, "x")]
    write_report("instructions", args, info, goals, details)
    return 0


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-install", action="store_true", help="skip BullMQ if it is not cached")
    parser.add_argument("--keep", action="store_true", help="keep the callgrind dumps (callgrind_annotate reads them)")


def _print(cycle: dict[str, float], tput: dict[str, float], bull: dict[str, float] | None, versions: str,
           n: int) -> None:
    print(f"server instructions per operation, {n} operations per phase; anchor: {versions}")
    rows = [["add", cycle["add"]], ["claim", cycle["claim"]], ["complete", cycle["complete"]],
            ["cycle (add + claim + complete)", cycle["cycle"]],
            [f"throughput loop, per task: claim_many({BATCH})", tput["claim"]],
            ["throughput loop, per task: complete_many", tput["complete"]],
            ["throughput loop, per task", tput["task"]]]
    if bull is not None:
        rows += [["BullMQ add (Queue.add)", bull["add"]], ["BullMQ run (Worker, concurrency 1)", bull["run"]],
                 ["BullMQ cycle", bull["cycle"]], ["clawq cycle ÷ BullMQ cycle", cycle["cycle"] / bull["cycle"]]]
    print_table("instructions (callgrind)", ["", "instructions"], rows)


if __name__ == "__main__":
    raise SystemExit(main())
