"""scaling: claim cost as the queue grows, memory per queued task, and a scan-based selector for contrast.

Each level (boards, queued tasks) is its own namespace in one private redis-server: the 8 chain keys of
bench/_clawq.py (5 chains, 3 pinned models; one model cooling, one at its cap, so 2 of 8 boards are never
claimable). Tasks are loaded with raw add_task EVALSHAs, 1000 per pipeline (empty prompts, title "t"); the load
time and the used_memory delta per task are recorded. The smallest level is measured alone first (the keyspace
is still small), then all levels side by side, rounds interleaved: batches of claims (RESETSTAT, claims, read
cmdstat_evalsha), then their completes (follow-ups: the queue keeps its size), then the scan baseline
(bench/scan_select.lua). Figures are medians over rounds; the goal is claim(largest) / claim(smallest) ≤ 1.3.

    python -m bench.scaling [--quick] [--rounds N] [--json FILE]
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from clawq.broker import Broker, Claim

from ._clawq import BIG_CAP, bench_config, claim_batch, claimable_share, complete_all, load_tasks, new_broker, plan
from ._common import Goal, bench_args, evalsha_cost, median, print_table, reset_stats, write_report
from ._memory import dict_bucket_bytes, field_savings, per_task_breakdown, used_memory
from ._profile import breakdown, measure
from ._server import BenchServer, machine_info

FULL_LEVELS = ((10, 100), (1_000, 10_000), (100_000, 1_000_000))
QUICK_LEVELS = ((10, 100), (100, 1_000), (1_000, 10_000))
GOAL_RATIO = 1.3
GOAL_BYTES = 250.0
SCAN_KEYS = ("boards", "cfg_chains", "cfg_model_cap", "cfg_provider_cap", "cfg_model_provider", "inflight_model",
             "inflight_provider", "running")


@dataclass
class Level:
    """One namespace under test and what was measured on it."""

    boards: int
    tasks: int
    broker: Broker
    load_s: float = 0.0
    load_add_usec: float = 0.0
    mem_delta: int = 0
    events_bytes: int = 0
    bucket_bytes: int = 0
    claim_us: list[float] = field(default_factory=list)
    complete_us: list[float] = field(default_factory=list)
    scan_us: list[float] = field(default_factory=list)
    alone_us: list[float] = field(default_factory=list)
    refused: int = 0
    batch: int = 1  #: claims per measured batch: the same at every level, so every level is measured alike
    claim_stats: list[dict[str, tuple[int, int]]] = field(default_factory=list)
    claims_made: int = 0

    @property
    def scans(self) -> int:
        return max(2, min(200, 20_000 // self.boards))


def batch_size(specs: tuple[tuple[int, int], ...]) -> int:
    """Claims per batch: half the claimable boards of the smallest level (so no claim is refused), at most 200."""
    return max(1, min(200, min(int(boards * claimable_share()) // 2 for boards, _ in specs)))


def load_level(client: redis.Redis, boards: int, tasks: int, batch: int) -> Level:
    broker = new_broker(client, f"s{boards}", bench_config())
    broker.config()
    level = Level(boards, tasks, broker, batch=batch)
    events0, mem0, keys0 = _events_bytes(broker), used_memory(client), int(client.dbsize())
    reset_stats(client)
    t0 = time.perf_counter()
    load_tasks(broker, plan(boards, tasks))
    level.load_s = time.perf_counter() - t0
    calls, usec = evalsha_cost(client)
    level.load_add_usec = usec / max(1, calls)
    level.mem_delta = used_memory(client) - mem0
    level.events_bytes = _events_bytes(broker) - events0
    level.bucket_bytes = dict_bucket_bytes(keys0, int(client.dbsize()))
    print(f"loaded {tasks:,} tasks on {boards:,} boards in {level.load_s:.1f} s "
          f"({tasks / level.load_s:,.0f}/s, {level.load_add_usec:.0f} µs server per add_task)", flush=True)
    return level


def _events_bytes(broker: Broker) -> int:
    return int(broker.client.memory_usage(broker.keys.events, samples=0) or 0)


def _claim_phase(level: Level, out: list[Claim]) -> Any:
    def run() -> int:
        claims, refused = claim_batch(level.broker, level.batch)
        out.extend(claims)
        level.refused += refused
        return len(claims) + refused

    return run


def _complete_phase(level: Level, claims: list[Claim]) -> Any:
    def run() -> int:
        complete_all(level.broker, claims)
        return len(claims)

    return run


def measure_claims(level: Level, target: int) -> tuple[float, float]:
    """Server µs per claim and per complete over ``target`` claims, in batches (each phase reset and read)."""
    totals = [0.0, 0, 0.0, 0]
    while totals[1] < target:
        claims: list[Claim] = []
        us, stats = measure(level.broker.client, _claim_phase(level, claims))
        level.claim_stats.append(stats)
        level.claims_made += len(claims)
        totals[0] += us * len(claims)
        totals[1] += len(claims)
        cus, _ = measure(level.broker.client, _complete_phase(level, claims))
        totals[2] += cus * len(claims)
        totals[3] += len(claims)
    return totals[0] / totals[1], totals[2] / totals[3]


def measure_scan(level: Level, sha: str) -> float:
    b = level.broker
    keys = [str(getattr(b.keys, name)) for name in SCAN_KEYS]

    def run() -> int:
        for _ in range(level.scans):
            reply = b.client.evalsha(sha, len(keys), *keys, b.keys.prefix, int(time.time() * 1000), BIG_CAP)
            if int(reply[0]) != 0:
                raise RuntimeError(f"the scan baseline found nothing to claim on {level.boards} boards")
        return level.scans

    us, _ = measure(b.client, run)
    return us


def run_rounds(levels: list[Level], rounds: int, target: int, scan_sha: str) -> None:
    """Interleaved: each round visits every level, starting one level later than the round before."""
    for r in range(rounds):
        for i in range(len(levels)):
            level = levels[(r + i) % len(levels)]
            claim_us, complete_us = measure_claims(level, target)
            level.claim_us.append(claim_us)
            level.complete_us.append(complete_us)
            level.scan_us.append(measure_scan(level, scan_sha))
        print(f"round {r + 1}/{rounds} done", flush=True)


def _level_doc(lv: Level) -> dict[str, Any]:
    return {
        "boards": lv.boards, "tasks": lv.tasks, "load_s": round(lv.load_s, 2),
        "load_tasks_per_s": round(lv.tasks / lv.load_s), "add_task_usec": round(lv.load_add_usec, 1),
        "mem_bytes_per_task": round(lv.mem_delta / lv.tasks, 1),
        "mem_bytes_per_task_excl_events": round((lv.mem_delta - lv.events_bytes) / lv.tasks, 1),
        "claim_usec": median(lv.claim_us), "complete_usec": median(lv.complete_us), "scan_usec": median(lv.scan_us),
        "claim_usec_alone": median(lv.alone_us), "claim_usec_rounds": lv.claim_us, "scan_usec_rounds": lv.scan_us,
        "claim_breakdown": breakdown(lv.claim_stats, lv.claims_made), "refused_claims": lv.refused,
        "claims_per_batch": lv.batch, "scans_per_round": lv.scans,
    }


def _ratios(levels: list[Level]) -> dict[str, float]:
    small, large = levels[0], levels[-1]
    per_round = [lc / sc for lc, sc in zip(large.claim_us, small.claim_us, strict=True)]
    return {
        "claim_largest_over_smallest": median(per_round),
        "claim_largest_over_smallest_alone": median(large.claim_us) / median(small.alone_us),
        "complete_largest_over_smallest": median(large.complete_us) / median(small.complete_us),
        "scan_largest_over_smallest": median(large.scan_us) / median(small.scan_us),
        "scan_over_claim_smallest": median(small.scan_us) / median(small.claim_us),
        "scan_over_claim_largest": median(large.scan_us) / median(large.claim_us),
    }


def _print(levels: list[Level], ratios: dict[str, float], memory: list[dict[str, Any]],
           fields: dict[str, Any]) -> None:
    print_table("per level (server µs per EVALSHA, median of rounds)",
                ["boards", "tasks", "load s", "add µs", "B/task", "B/task excl events", "claim µs", "complete µs",
                 "scan µs", "scan ÷ claim"],
                [[lv.boards, lv.tasks, lv.load_s, lv.load_add_usec, lv.mem_delta / lv.tasks,
                  (lv.mem_delta - lv.events_bytes) / lv.tasks, median(lv.claim_us), median(lv.complete_us),
                  median(lv.scan_us), median(lv.scan_us) / median(lv.claim_us)] for lv in levels])
    print_table("ratios", ["ratio", "value"], [[k, v] for k, v in ratios.items()])
    _print_profiles(levels[0], levels[-1])
    print_table(f"memory per queued task at {levels[-1].tasks:,} tasks", ["part", "bytes/task"],
                [[r["part"], r["bytes_per_task"]] for r in memory])
    print_table(f"task hash: MEMORY USAGE {fields['hash_bytes']} bytes ({fields['encoding']}, payload "
                f"{fields['listpack_payload_bytes']} bytes); each field's listpack bytes",
                ["field", "value", "listpack bytes"], [[r["field"], r["value"], r["listpack_bytes"]]
                                                      for r in fields["fields"]])
    print_table("task hash with the fields add_task leaves out put back, one after another (the layout before; "
                "jemalloc size classes)", ["+ put back", "hash bytes", "extra"],
                [[r["field"], r["hash_bytes"], r["extra_bytes"]] for r in fields["cumulative_add_back"]])


def _print_profiles(small: Level, large: Level) -> None:
    rows_s = {r["command"]: r for r in breakdown(small.claim_stats, small.claims_made)}
    rows_l = {r["command"]: r for r in breakdown(large.claim_stats, large.claims_made)}
    names = list(dict.fromkeys([*rows_l, *rows_s]))
    zero = {"calls_per_op": 0.0, "usec_per_op": 0.0}
    print_table(f"claim_task inner commands per claim: {small.boards:,} vs {large.boards:,} boards",
                ["command", "calls small", "calls large", "µs small", "µs large"],
                [[n, rows_s.get(n, zero)["calls_per_op"], rows_l.get(n, zero)["calls_per_op"],
                  rows_s.get(n, zero)["usec_per_op"], rows_l.get(n, zero)["usec_per_op"]] for n in names])


def _scan_sha(client: redis.Redis) -> str:
    return str(client.script_load((Path(__file__).parent / "scan_select.lua").read_text()))


def main() -> None:
    args = bench_args("claim cost vs queue size, memory per task, scan-based baseline")
    specs = QUICK_LEVELS if args.quick else FULL_LEVELS
    rounds, target = (args.rounds or 3, 300) if args.quick else (args.rounds or 5, 1000)
    with BenchServer() as srv:
        client = srv.client(decode_responses=True)
        scan_sha = _scan_sha(client)
        batch = batch_size(specs)
        levels = [load_level(client, *specs[0], batch)]
        for _ in range(rounds):
            levels[0].alone_us.append(measure_claims(levels[0], target)[0])
        levels += [load_level(client, *spec, batch) for spec in specs[1:]]
        largest = levels[-1]  # its memory is read before any claim adds run fields to its heads
        memory = per_task_breakdown(largest.broker, largest.boards, largest.tasks, largest.mem_delta, {
            "events stream (capped at ~10,000 entries: fixed, not per task)": largest.events_bytes,
            "main dict buckets (8 bytes per bucket, power of two; estimate)": largest.bucket_bytes})
        fields = field_savings(largest.broker)
        run_rounds(levels, rounds, target, scan_sha)
        machine = machine_info(srv.version)
    ratios = _ratios(levels)
    _print(levels, ratios, memory, fields)
    goals = [
        Goal("claim cost largest / smallest level", ratios["claim_largest_over_smallest"], GOAL_RATIO, "x"),
        # The event stream is capped (~10,000 entries, about 0.9 MB once full) whatever the queue's size: at
        # 1,000,000 tasks it is under 1 B per task, at quick mode's 10,000 it would be ~88 B of a fixed cost.
        Goal(f"Redis memory per queued task ({largest.tasks:,} tasks; the capped event stream left out)",
             (largest.mem_delta - largest.events_bytes) / largest.tasks, GOAL_BYTES, "bytes"),
    ]
    details = {"levels": [_level_doc(lv) for lv in levels], "ratios": ratios, "memory_per_task": memory,
               "task_hash_fields": fields, "rounds": rounds, "claims_per_round": target,
               "load_s_total": round(sum(lv.load_s for lv in levels), 1)}
    write_report("scaling", args, machine, goals, details)


if __name__ == "__main__":
    main()
