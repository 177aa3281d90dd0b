"""clawq benchmarks: run as modules from the repo root, e.g. ``python -m bench.claim_cost --quick``.

Every script starts its own private ``redis-server`` (never 127.0.0.1:6379), measures side by side in one run,
prints a table and, with ``--json FILE``, writes its results. See BENCHMARKS.md.
"""
