"""Everything that runs things: the dispatcher loop, the RQ job, agent runners, notifiers, the simulator.

This is the only package that imports rq. It is filled in by the execution issue; the broker core does not
depend on it.
"""

__all__: list[str] = []
