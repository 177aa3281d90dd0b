"""A namespace's identity: an id written once into its ``meta`` hash, so a wiped namespace is noticed.

A Redis restart without persistence, a failover to an empty replica or a FLUSHALL leaves an empty namespace
behind, and an empty namespace looks new. Each namespace therefore gets a random ``id`` and its
``created_at`` (ms) when it is first set up. A long-running process remembers the id it saw and checks it on
reads it makes anyway (the dispatcher's per-wake state read, a config reload, the health read). When the id
changed or vanished, the namespace it knew is gone: it says so (:class:`~broker.errors.NamespaceWiped`).

The process that restores the namespace records in ``meta`` what happened: ``recreated_at`` (ms, when it
noticed), ``previous_id`` and ``noticed_by``, so ``clawq health`` and ``clawq doctor`` can tell.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any

__all__ = ["MetaFields", "NamespaceInfo", "new_identity", "process_name"]


class MetaFields:
    """Field names of the ``meta`` hash."""

    SCHEMA = "schema_version"
    ID = "id"
    CREATED_AT = "created_at"
    RECREATED_AT = "recreated_at"
    PREVIOUS_ID = "previous_id"
    NOTICED_BY = "noticed_by"


def new_identity() -> str:
    """A fresh namespace id (random, 16 hex digits)."""
    return uuid.uuid4().hex[:16]


def process_name(what: str) -> str:
    """``<what>@<host>:<pid>``: who noticed a wipe (kept in ``meta``)."""
    return f"{what}@{socket.gethostname()}:{os.getpid()}"


def _ms_to_s(value: Any) -> float | None:
    try:
        return int(value) / 1000 if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class NamespaceInfo:
    """What ``meta`` says about the namespace (all None for an empty namespace)."""

    id: str | None = None
    created_at: float | None = None  #: epoch seconds
    recreated_at: float | None = None  #: epoch seconds: when a process noticed the wipe and re-created it
    previous_id: str | None = None
    noticed_by: str | None = None

    @classmethod
    def from_meta(cls, meta: dict[str, str]) -> NamespaceInfo:
        return cls(
            id=meta.get(MetaFields.ID) or None,
            created_at=_ms_to_s(meta.get(MetaFields.CREATED_AT)),
            recreated_at=_ms_to_s(meta.get(MetaFields.RECREATED_AT)),
            previous_id=meta.get(MetaFields.PREVIOUS_ID) or None,
            noticed_by=meta.get(MetaFields.NOTICED_BY) or None,
        )

    def doc(self) -> dict[str, Any]:
        """For the health document: ``{"id", "created_at", "recreated": {...} | None}``."""
        recreated = None
        if self.recreated_at is not None:
            recreated = {"at": self.recreated_at, "previous_id": self.previous_id, "noticed_by": self.noticed_by}
        return {"id": self.id, "created_at": self.created_at, "recreated": recreated}

    def recreated_line(self, when: str) -> str | None:
        """One line for humans when the namespace was re-created (``when``: the formatted time), else None."""
        if self.recreated_at is None:
            return None
        return (f"namespace re-created at {when}: it was wiped (Redis restarted without persistence, failed over "
                f"to an empty replica, or was flushed) and lost every task of {self.previous_id or '?'}; noticed "
                f"by {self.noticed_by or '?'}")
