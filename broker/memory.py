"""Whether Redis may delete clawq's keys by itself: its ``maxmemory-policy``, read once at start-up.

Under any policy but ``noeviction``, a Redis at its ``maxmemory`` silently deletes keys to make room, and
clawq's keys are state, not cache: a task hash, a lease or a counter that vanishes loses work or breaks an
invariant (BullMQ warns the same way). Under ``noeviction`` a write beyond the limit is refused instead,
which clawq reports as :class:`~broker.errors.RedisOutOfMemory` with nothing written (a script refused at its
first write writes nothing; once it wrote, Redis lets it finish: checked on 6.2 and 7.0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis
from redis.exceptions import RedisClusterException

__all__ = ["SAFE_POLICY", "MemoryState", "read_memory"]

#: The only policy under which Redis never deletes a key by itself.
SAFE_POLICY = "noeviction"


@dataclass(frozen=True)
class MemoryState:
    """``INFO memory`` as far as clawq cares; ``policy`` None when Redis would not say (INFO not allowed)."""

    policy: str | None
    maxmemory: int = 0
    used: int = 0

    @property
    def evicts(self) -> bool:
        return self.policy is not None and self.policy != SAFE_POLICY

    def warning(self) -> str | None:
        """One line when Redis may evict clawq's keys, else None."""
        if not self.evicts:
            return None
        return (f"Redis maxmemory-policy is {self.policy}: under memory pressure Redis silently deletes keys, "
                f"clawq's tasks, leases and counters among them; set maxmemory-policy {SAFE_POLICY} "
                f"(CONFIG SET maxmemory-policy {SAFE_POLICY}, and in redis.conf)")

    def doc(self) -> dict[str, Any]:
        return {"maxmemory_policy": self.policy, "maxmemory": self.maxmemory, "used_memory": self.used,
                "evicts": self.evicts}


def _section(info: Any) -> dict[str, Any]:
    """The memory section of one node (a cluster client answers per node: any node's policy will do)."""
    if isinstance(info, dict) and "maxmemory_policy" not in info:
        nodes = [v for v in info.values() if isinstance(v, dict)]
        return nodes[0] if nodes else {}
    return info if isinstance(info, dict) else {}


def read_memory(client: Any) -> MemoryState:
    """The policy, limit and use of the server ``client`` talks to. A server that refuses INFO (an ACL
    without it) gives policy None; a server that cannot be reached raises redis-py's error."""
    try:
        info = _section(client.info("memory"))
    except (redis.ResponseError, RedisClusterException):
        return MemoryState(policy=None)
    policy = info.get("maxmemory_policy")
    return MemoryState(policy=None if policy is None else str(policy), maxmemory=int(info.get("maxmemory") or 0),
                       used=int(info.get("used_memory") or 0))
