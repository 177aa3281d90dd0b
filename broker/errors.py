"""One exception hierarchy for clawq, and the one map from script status codes to it.

Every error carries a one-line message and the CLI exit code it maps to: 2 bad input, 3 nothing to claim,
4 run fenced, 1 anything else.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

__all__ = [
    "ClawqError",
    "ConfigError",
    "ConfigInUse",
    "DuplicateTask",
    "InputError",
    "InvalidState",
    "NamespaceWiped",
    "NothingToClaim",
    "RedisOutOfMemory",
    "RedisUnavailable",
    "RunFenced",
    "SchemaMismatch",
    "ScriptError",
    "Status",
    "TaskNotFound",
    "UnknownChain",
    "error_for",
]


class Status(enum.IntEnum):
    """Status codes returned by the Lua scripts (first element of every reply); see lua/README.md."""

    OK = 0  #: done
    NOT_FOUND = 1  #: the task does not exist
    FENCED = 2  #: the run is not the task's active run (lease lost, reaped, completed or replaced)
    BAD_STATE = 3  #: the task's status does not allow the operation
    DUPLICATE = 4  #: a task with that id already exists
    UNKNOWN_CHAIN = 5  #: the chain, pinned model or provider is not in the config
    NOTHING = 6  #: no task can be claimed now (skip reasons follow)
    CONFIG_STALE = 7  #: the caller computed its arguments from an older config (retried internally)
    REPEATED = 8  #: the same outcome was already recorded for this run (success, nothing changed)
    CONFIG_IN_USE = 9  #: the new config drops a chain or model that unfinished tasks still use


class ClawqError(Exception):
    """Base of every clawq error."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InputError(ClawqError):
    """Bad input: usage, validation, unknown names, duplicates."""

    exit_code = 2


class ConfigError(InputError):
    """The configuration is invalid."""


class ConfigInUse(InputError):
    """A new config would drop a chain or model that unfinished tasks still need."""


class UnknownChain(InputError):
    """The chain or pinned model is not in the effective config."""


class DuplicateTask(InputError):
    """A task with this id already exists."""

    def __init__(self, task_id: int) -> None:
        super().__init__(f"task {task_id} already exists")
        self.task_id = task_id


class TaskNotFound(InputError):
    """No task with this id."""

    def __init__(self, task_id: int) -> None:
        super().__init__(f"task {task_id} not found")
        self.task_id = task_id


class InvalidState(InputError):
    """The task's status does not allow this operation."""


class NothingToClaim(ClawqError):
    """No task can run now; ``skip_reasons`` says why, by reason."""

    exit_code = 3

    def __init__(self, skip_reasons: Mapping[str, int]) -> None:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(skip_reasons.items())) or "queue empty"
        super().__init__(f"nothing to claim ({reasons})")
        self.skip_reasons = dict(skip_reasons)


class RunFenced(ClawqError):
    """The run is not the task's active run any more: its report is refused."""

    exit_code = 4

    def __init__(self, task_id: int, run_id: str, detail: str) -> None:
        super().__init__(f"run {run_id} of task {task_id} is fenced: {detail}")
        self.task_id = task_id
        self.run_id = run_id


class RedisUnavailable(ClawqError):
    """Redis could not be reached."""


class RedisOutOfMemory(ClawqError):
    """Redis refused a write: it is at its ``maxmemory`` under the ``noeviction`` policy (nothing was written)."""


class NamespaceWiped(ClawqError):
    """The namespace this process knew is gone: its identity (``meta`` ``id``) changed or vanished.

    A Redis restart without persistence, a failover to an empty replica or a FLUSHALL does that. ``previous``
    is the identity this process knew, ``current`` the one found now (None: the namespace is empty), and
    ``last_config`` the last config this process read from it (None if it never read a stored one).
    """

    def __init__(self, namespace: str, previous: str, current: str | None, last_config: object = None) -> None:
        now = f"re-created as {current}" if current else "empty"
        super().__init__(
            f"namespace {namespace!r} was wiped (it was {previous}, it is now {now}): Redis restarted without "
            "persistence, failed over to an empty replica, or was flushed; every task it held is gone"
        )
        self.namespace = namespace
        self.previous = previous
        self.current = current
        self.last_config = last_config
        self.logged = False  #: a process that says it once marks it here


class SchemaMismatch(ClawqError):
    """The namespace was written by an incompatible clawq version."""


class ScriptError(ClawqError):
    """A script answered something this version does not understand."""


class ConfigMissing(ScriptError):
    """A script found no config setting it needs: the namespace lost its config (wiped, flushed or evicted)."""


def error_for(status: Status, task_id: int, run_id: str, detail: str) -> ClawqError:
    """Map a non-OK script status concerning one task (and maybe one run) to its exception."""
    if status is Status.NOT_FOUND:
        return TaskNotFound(task_id)
    if status is Status.FENCED:
        return RunFenced(task_id, run_id, detail)
    if status is Status.BAD_STATE:
        return InvalidState(f"task {task_id}: {detail}")
    if status is Status.DUPLICATE:
        return DuplicateTask(task_id)
    if status is Status.UNKNOWN_CHAIN:
        return UnknownChain(detail)
    if status is Status.CONFIG_IN_USE:
        return ConfigInUse(detail)
    return ScriptError(f"unexpected script status {status.name}: {detail}")
