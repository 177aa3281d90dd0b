"""Run every benchmark (each in its own process) and print one table of the goals.

    python bench/run_all.py [--quick] [--json FILE] [--only claim_cost,scaling,...]

Each benchmark writes its JSON beside the combined one (``FILE`` minus ``.json``, plus ``-<bench>.json``) or, with
no ``--json``, into a temporary directory. Exits 1 if a benchmark failed (not if a goal is missed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCHES = ("claim_cost", "scaling", "e2e", "latency", "bullmq", "instructions")


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="run every clawq benchmark")
    parser.add_argument("--quick", action="store_true", help="the quick mode of each (under a minute each)")
    parser.add_argument("--json", dest="json_path", default=None, help="write the combined results here")
    parser.add_argument("--only", default=",".join(BENCHES), help="comma-separated benchmarks to run")
    return parser.parse_args()


def run_one(name: str, quick: bool, out: Path) -> tuple[int, float]:
    argv = [sys.executable, "-m", f"bench.{name}", "--json", str(out), *(["--quick"] if quick else [])]
    print(f"\n=== {name} ({'quick' if quick else 'full'}) ===", flush=True)
    t0 = time.monotonic()
    code = subprocess.call(argv, cwd=ROOT)
    return code, time.monotonic() - t0


def _summary(docs: dict[str, dict[str, Any]], seconds: dict[str, float]) -> list[list[str]]:
    rows = []
    for name, doc in docs.items():
        for g in doc["goals"]:
            rows.append([name, g["name"], f"{g['measured']:.3g}" if g["measured"] is not None else "-",
                         f"<= {g['limit']:g} {g['unit']}", "met" if g["met"] else "MISSED", f"{seconds[name]:.0f}s"])
    return rows


def _print(rows: list[list[str]]) -> None:
    headers = ["bench", "goal", "measured", "limit", "", "run time"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("\n" + "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


def main() -> None:
    args = _args()
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(BENCHES))
    if unknown:
        sys.exit(f"unknown benchmark(s): {unknown}; known: {list(BENCHES)}")
    with tempfile.TemporaryDirectory(prefix="clawq-bench-") as tmp:
        base = Path(args.json_path).with_suffix("") if args.json_path else Path(tmp) / "bench"
        docs: dict[str, dict[str, Any]] = {}
        seconds: dict[str, float] = {}
        failed = []
        for name in names:
            out = Path(f"{base}-{name}.json")
            code, seconds[name] = run_one(name, args.quick, out)
            if code != 0 or not out.exists():
                failed.append(name)
                continue
            docs[name] = json.loads(out.read_text())
    if docs:
        _print(_summary(docs, seconds))
    if args.json_path:
        combined = {"mode": "quick" if args.quick else "full", "benches": docs, "failed": failed, "seconds": seconds}
        Path(args.json_path).write_text(json.dumps(combined, indent=2) + "\n")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
