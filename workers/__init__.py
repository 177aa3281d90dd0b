"""Everything that runs things in production: the dispatcher loop, the RQ job, agent runners, notifiers.

This is the only package that imports rq. The broker core does not depend on it, and it never imports the
simulation (``sim/``), which sits above it.
"""

__all__: list[str] = []
