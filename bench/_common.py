"""What every benchmark shares: arguments, medians, Redis command statistics, the table and the JSON report."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis

__all__ = [
    "ROOT",
    "Goal",
    "bench_args",
    "cmdstats",
    "evalsha_cost",
    "median",
    "percentile",
    "print_table",
    "reset_stats",
    "write_report",
]

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Goal:
    """One goal of the issue: a measured figure against its limit (lower is better)."""

    name: str
    measured: float
    limit: float
    unit: str

    @property
    def met(self) -> bool:
        return math.isfinite(self.measured) and self.measured <= self.limit

    def doc(self) -> dict[str, Any]:
        return {**asdict(self), "met": self.met}


def bench_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a small run (under a minute)")
    parser.add_argument("--json", dest="json_path", metavar="FILE", default=None, help="write the results here")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (the median is reported)")
    if extra is not None:
        extra(parser)
    return parser.parse_args()


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (p50, p99) of ``values``."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return float(ordered[rank - 1])


# -- Redis INFO commandstats ------------------------------------------------------------------------------
def reset_stats(client: redis.Redis) -> None:
    client.config_resetstat()


def cmdstats(client: redis.Redis) -> dict[str, tuple[int, int]]:
    """``{command: (calls, usec)}`` since the last CONFIG RESETSTAT (INFO commandstats)."""
    raw: dict[str, Any] = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for k, v in raw.items()}


def evalsha_cost(client: redis.Redis) -> tuple[int, int]:
    """(calls, usec) of EVALSHA since the last reset."""
    return cmdstats(client).get("evalsha", (0, 0))


# -- output ---------------------------------------------------------------------------------------------
def _cell(value: Any) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    sys.stdout.flush()


def write_report(bench: str, args: argparse.Namespace, machine: dict[str, Any], goals: Sequence[Goal],
                 details: dict[str, Any]) -> dict[str, Any]:
    """Print the goals table and write the JSON document (with ``--json``); returns the document."""
    print_table(f"{bench}: goals ({'quick' if args.quick else 'full'} mode)",
                ["goal", "measured", "limit", "unit", "met"],
                [[g.name, g.measured, g.limit, g.unit, "yes" if g.met else "NO"] for g in goals])
    doc = {
        "bench": bench,
        "mode": "quick" if args.quick else "full",
        "machine": machine,
        "goals": [g.doc() for g in goals],
        "details": details,
    }
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(_finite(doc), indent=2, default=str, allow_nan=False) + "\n")
    return doc


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as null (strict JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
