"""The simulation: the seeded plan and ``clawq simulate`` (:mod:`.simulator`), the fake agent (:mod:`.agent`),
the process fleet shared by the simulation, the chaos run, the end-to-end tests and the benchmarks
(:mod:`.fleet`), and the independent checker of a run's timeline (:mod:`.checker`, :mod:`.timeline`).

It sits above ``workers/`` and ``broker/`` and may import both; nothing below imports it. A production worker
reaches the fake agent only when its config says ``agent.runner: simulated``, by import path.
"""

__all__: list[str] = []
