"""claim_cost: server-side µs per claim and per complete, against a trivial 4-command EVALSHA, same server and run.

Each round resets INFO commandstats (CONFIG RESETSTAT) before each phase and reads ``cmdstat_evalsha``
usec/calls after it: a trivial 4-command script, an empty script, N claims, N completes (follow-ups, so the queue
keeps its size), and truncated copies of claim_task / complete_run that stop after a section, to see which
section costs what. The figures are medians over the rounds; the goal is (claim + complete) / trivial ≤ 2.

    python -m bench.claim_cost [--quick] [--rounds N] [--json FILE]
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from clawq.broker import Broker, Claim

from ._clawq import (
    BIG_CAP,
    FOLLOW_UP,
    bench_config,
    claim_batch,
    claimable_share,
    complete_all,
    load_tasks,
    new_broker,
    plan,
)
from ._common import Goal, bench_args, median, print_table, write_report
from ._profile import breakdown, inner_calls, measure, recording_copy, replay_source, truncated_variants
from ._server import BenchServer, machine_info

TRIVIAL = """
redis.call("GET", KEYS[1])
redis.call("INCR", KEYS[2])
redis.call("HSET", KEYS[3], "f", ARGV[1])
return redis.call("HGET", KEYS[3], "f")
"""
EMPTY = "return 1"
#: Truncation points: (label of the section that ends there, the line it ends before); cumulative, in order.
CLAIM_ANCHORS = (
    ("+ core library (inlined lib/core.lua)", "local K = {cfg_claim"),
    ("+ its own prelude", "K.conf = read_claim_config(K.cfg_claim)"),
    ("+ version check, backoff sweep", "-- Nothing claimable: every waiting board counts once"),
)
COMPLETE_ANCHORS = (
    ("+ core library (inlined lib/core.lua)", "local K = keys_from(RUN_END_KEYS, 2)"),
    ("+ its own prelude", "local t, code, detail = active_run(P, id, run_id)"),
    ("+ fence check", 'local follow_up = follow == "1"'),  # inside lib/core.lua complete_one
)
#: The fewest redis.call()s any claim and complete that keep the queue's rules and its observability could
#: make, with no reads beyond what a decision needs. Claim (14): the config version, SMEMBERS of the ready lines,
#: ZCARD running, the model blocks, one line's front, ZPOPMIN of the board queue, ZADD running, HSET of the task,
#: SET of the lease, HINCRBY of the model and of the provider counters, HSET of the board, ZREM from its ready
#: line, XADD of the event. Complete (10): HMGET of the task (fence), ZREM running, HINCRBY x2, HDEL of the board
#: slot, DEL of the lease, HSET of the task, ZADD to its next place, RPUSH of the context, XADD of the event.
FLOOR_CALLS = {"claim": 14, "complete": 10}
CALIBRATION = """for i = 1, tonumber(ARGV[1]) do redis.call("HGET", KEYS[1], "version") end
return 1
"""
CALIBRATION_CALLS = 70
GOAL_RATIO = 2.0


@dataclass
class Bench:
    """The namespace under test and the scripts it compares."""

    client: redis.Redis
    broker: Broker
    per_round: int
    shas: dict[str, str] = field(default_factory=dict)
    replay_calls: dict[str, int] = field(default_factory=dict)

    def load(self, label: str, source: str) -> None:
        self.shas[label] = str(self.client.script_load(source))

    def call(self, label: str, keys: list[str], args: list[Any]) -> Any:
        return self.client.evalsha(self.shas[label], len(keys), *keys, *args)


def _repeat(n: int, fn: Callable[[], Any]) -> Callable[[], int]:
    def run() -> int:
        for _ in range(n):
            fn()
        return n

    return run


def _trivial(b: Bench, label: str) -> float:
    p = b.broker.keys.prefix
    keys = [f"{p}bench:a", f"{p}bench:b", f"{p}bench:c", f"{p}bench:d"] if label == "trivial" else []
    args = ["v"] if label == "trivial" else []
    us, _ = measure(b.client, _repeat(b.per_round, lambda: b.call(label, keys, args)))
    return us


def _claim_args(b: Bench) -> list[Any]:
    return [b.broker.keys.prefix, int(time.time() * 1000), str(uuid.uuid4()), BIG_CAP, 0, b.broker._config_version]


def _claim_variant(b: Bench, label: str) -> tuple[float, dict[str, tuple[int, int]]]:
    keys = b.broker._scripts.keys_for("claim_task")
    return measure(b.client, _repeat(b.per_round, lambda: b.call(label, keys, _claim_args(b))))


def _replay(b: Bench, name: str) -> float:
    us, _ = measure(b.client, _repeat(b.per_round, lambda: b.call(f"replay:{name}", [], [])))
    return us


def _calibration(b: Bench) -> float:
    """µs per redis.call() of a cheap command (HGET of a small hash), from 70 calls minus the empty script."""
    keys = [b.broker.keys.cfg_settings]
    us, _ = measure(b.client, _repeat(b.per_round, lambda: b.call("calibration", keys, [CALIBRATION_CALLS])))
    return us


def _complete_variant(b: Bench, label: str, claims: list[Claim]) -> float:
    digest = FOLLOW_UP.digest()

    def run() -> int:
        for c in claims:
            keys = b.broker._scripts.keys_for("complete_run", task_id=c.task_id)
            args = [b.broker.keys.prefix, int(time.time() * 1000), c.task_id, c.run_id, 1, "again", "s", "{}", digest]
            b.call(label, keys, args)
        return len(claims)

    us, _ = measure(b.client, run)
    return us


def _claims(b: Bench, out: list[Claim]) -> Callable[[], int]:
    def run() -> int:
        claims, refused = claim_batch(b.broker, b.per_round)
        out.extend(claims)
        return len(claims) + refused

    return run


def _complete(b: Bench, claims: list[Claim]) -> Callable[[], int]:
    def run() -> int:
        complete_all(b.broker, claims)
        return len(claims)

    return run


def run_round(b: Bench) -> dict[str, Any]:
    """One round: every phase once; the truncated copies run while their input is there (they write nothing)."""
    row: dict[str, Any] = {"trivial": _trivial(b, "trivial"), "empty": _trivial(b, "empty")}
    for label in ["claim:empty", *(f"claim:{a}" for a, _ in CLAIM_ANCHORS)]:
        if label in b.shas:
            row[label], stats = _claim_variant(b, label)
            row[f"{label} calls"] = inner_calls(stats, b.per_round)
    row["calibration"] = _calibration(b)
    for name in b.replay_calls:
        row[f"replay:{name}"] = _replay(b, name)
    claims: list[Claim] = []
    row["claim"], row["claim_stats"] = measure(b.client, _claims(b, claims))
    row["complete:empty"] = _complete_variant(b, "empty", claims)
    for label, _ in COMPLETE_ANCHORS:
        row[f"complete:{label}"] = _complete_variant(b, f"complete:{label}", claims)
    row["complete"], row["complete_stats"] = measure(b.client, _complete(b, claims))
    row["ops"] = len(claims)
    return row


def _sizes(quick: bool) -> tuple[int, int, int, int]:
    """boards, tasks, claims per round, rounds."""
    return (400, 2_000, 150, 3) if quick else (2_000, 20_000, 500, 7)


def _setup(srv: BenchServer, boards: int, tasks: int, per_round: int) -> Bench:
    client = srv.client(decode_responses=True)
    broker = new_broker(client, "cost", bench_config())
    broker.config()  # cache the config version the raw claim copies send
    load_tasks(broker, plan(boards, tasks))
    b = Bench(client, broker, per_round)
    b.load("trivial", TRIVIAL)
    b.load("empty", EMPTY)
    for label, source in truncated_variants("claim_task", CLAIM_ANCHORS).items():
        b.load(f"claim:{label}", source)
    for label, source in truncated_variants("complete_run", COMPLETE_ANCHORS).items():
        b.load(f"complete:{label}", source)
    b.load("claim:empty", EMPTY)
    b.load("calibration", CALIBRATION)
    for name, calls in _record(srv).items():
        b.load(f"replay:{name}", replay_source(calls))
        b.replay_calls[name] = len(calls)
    return b


def _record(srv: BenchServer) -> dict[str, list[list[Any]]]:
    """The redis.call()s of one real claim and one real complete (recording copies, in a namespace of their own)."""
    client = srv.client(decode_responses=True)
    broker = new_broker(client, "replay", bench_config())
    broker.config()
    load_tasks(broker, plan(200, 1000))
    out: dict[str, list[list[Any]]] = {}
    claim_src, complete_src = recording_copy("claim_task"), recording_copy("complete_run")
    if claim_src:
        keys = broker._scripts.keys_for("claim_task")
        args: list[str | int] = [broker.keys.prefix, int(time.time() * 1000), str(uuid.uuid4()), BIG_CAP, 0,
                                 broker._config_version]
        out["claim"] = client.eval(claim_src, len(keys), *keys, *args)
    if complete_src:
        c = broker.claim()
        keys = broker._scripts.keys_for("complete_run", task_id=c.task_id)
        args = [broker.keys.prefix, int(time.time() * 1000), c.task_id, c.run_id, 1, "again", "s", "{}",
                FOLLOW_UP.digest()]
        out["complete"] = client.eval(complete_src, len(keys), *keys, *args)
    return out


def _med(rounds: list[dict[str, Any]], key: str) -> float:
    return median([r[key] for r in rounds if key in r])


def _summary(rounds: list[dict[str, Any]]) -> dict[str, float]:
    ratios = [(r["claim"] + r["complete"]) / r["trivial"] for r in rounds]
    out = {k: _med(rounds, k) for k in rounds[0] if not k.endswith("_stats") and k != "ops"}
    out["ratio_claim_plus_complete"] = median(ratios)
    out["ratio_claim"] = median([r["claim"] / r["trivial"] for r in rounds])
    out["ratio_complete"] = median([r["complete"] / r["trivial"] for r in rounds])
    return out


def _sections(summary: dict[str, float], op: str, anchors: tuple[tuple[str, str], ...]) -> list[list[Any]]:
    """Cumulative µs up to each truncation point, then the whole script; the difference is the section's cost."""
    steps = [(f"{op}: empty script with its KEYS and ARGV", summary[f"{op}:empty"])]
    steps += [(f"{op} {label}", summary.get(f"{op}:{label}", float("nan"))) for label, _ in anchors]
    steps.append((f"{op} + the rest (whole script)", summary[op]))
    rows, prev = [["EVALSHA floor (empty script, no keys)", summary["empty"], summary["empty"]]], summary["empty"]
    for name, us in steps:
        rows.append([name, us, us - prev])
        prev = us
    return rows


def _print(summary: dict[str, float], model: dict[str, float], claim_rows: list[dict[str, Any]],
           complete_rows: list[dict[str, Any]]) -> None:
    t = summary["trivial"]
    print_table("server µs per EVALSHA (median of rounds)", ["script", "µs/call", "x trivial"], [
        [name, summary[name], summary[name] / t] for name in ("empty", "trivial", "claim", "complete")
    ] + [["claim + complete", summary["claim"] + summary["complete"], summary["ratio_claim_plus_complete"]]])
    print_table("claim_task / complete_run by section (truncated copies)", ["section", "µs cumulative", "µs section"],
                _sections(summary, "claim", CLAIM_ANCHORS) + _sections(summary, "complete", COMPLETE_ANCHORS))
    _print_model(summary, model)
    for title, rows in (("claim_task", claim_rows), ("complete_run", complete_rows)):
        print_table(f"{title}: inner Redis commands per call (all rounds)", ["command", "calls/call", "µs/call"],
                    [[r["command"], r["calls_per_op"], r["usec_per_op"]] for r in rows])


def cost_model(summary: dict[str, float], claim_rows: list[dict[str, Any]], replay_calls: dict[str, int]
               ) -> dict[str, float]:
    """The scripts' µs split: a replay of their redis.call()s (no logic) and the rest, their Lua logic."""
    out = {"usec_per_redis_call": (summary["calibration"] - summary["empty"]) / CALIBRATION_CALLS,
           "claim_calls": float(claim_rows[-1]["calls_per_op"])}
    for name, calls in replay_calls.items():
        out[f"replay_{name}_calls"] = float(calls)
        out[f"{name}_logic_usec"] = summary[name] - summary[f"replay:{name}"]
        price = (summary[f"replay:{name}"] - summary["empty"]) / calls  # one call at this script's replay price
        out[f"floor_{name}_usec"] = summary["empty"] + FLOOR_CALLS[name] * price
    if all(f"floor_{name}_usec" in out for name in FLOOR_CALLS):
        out["floor_ratio"] = sum(out[f"floor_{name}_usec"] for name in FLOOR_CALLS) / summary["trivial"]
    return out


def _print_model(summary: dict[str, float], m: dict[str, float]) -> None:
    print_table("where the µs go: the script vs a replay of its redis.call()s (literal arguments, no logic)",
                ["part", "µs", "calls"], [
        ["EVALSHA floor (empty script)", summary["empty"], 0],
        [f"one redis.call (HGET of a small hash; from {CALIBRATION_CALLS} in a loop)", m["usec_per_redis_call"], 1],
        ["claim, as is", summary["claim"], m["claim_calls"]],
        ["  replay of one claim's calls", summary.get("replay:claim", float("nan")), m.get("replay_claim_calls", "")],
        ["  => claim's logic (Lua: key strings, tables, cjson, closures)", m.get("claim_logic_usec", float("nan")),
         ""],
        ["complete, as is", summary["complete"], ""],
        ["  replay of one complete's calls", summary.get("replay:complete", float("nan")),
         m.get("replay_complete_calls", "")],
        ["  => complete's logic", m.get("complete_logic_usec", float("nan")), ""],
        ["floor: the fewest calls a rule-keeping claim makes, no logic", m.get("floor_claim_usec", float("nan")),
         FLOOR_CALLS["claim"]],
        ["floor: the same for a complete", m.get("floor_complete_usec", float("nan")), FLOOR_CALLS["complete"]],
        ["  => (claim floor + complete floor) / trivial", m.get("floor_ratio", float("nan")), ""],
    ])


def main() -> None:
    args = bench_args("server-side cost of claim and complete vs a trivial 4-command EVALSHA")
    boards, tasks, per_round, rounds = _sizes(args.quick)
    per_round = min(per_round, int(boards * claimable_share()) // 2)
    with BenchServer() as srv:
        b = _setup(srv, boards, tasks, per_round)
        results = [run_round(b) for _ in range(args.rounds or rounds)]
        machine = machine_info(srv.version)
    ops = sum(r["ops"] for r in results)
    claim_rows = breakdown([r["claim_stats"] for r in results], ops)
    complete_rows = breakdown([r["complete_stats"] for r in results], ops)
    summary = _summary(results)
    model = cost_model(summary, claim_rows, b.replay_calls)
    _print(summary, model, claim_rows, complete_rows)
    goals = [Goal("(claim + complete) / trivial 4-command EVALSHA", summary["ratio_claim_plus_complete"],
                  GOAL_RATIO, "x")]
    details = {"boards": boards, "tasks": tasks, "calls_per_round": per_round, "rounds": len(results),
               "usec_per_call": summary, "cost_model": model,
               "claim_breakdown": claim_rows, "complete_breakdown": complete_rows,
               "rounds_raw": [{k: v for k, v in r.items() if not k.endswith("_stats")} for r in results]}
    write_report("claim_cost", args, machine, goals, details)


if __name__ == "__main__":
    main()
