"""Every type of event in the ``events`` stream, in one enum; ``lua/README.md`` has the same catalogue with the
fields of each (``tests/test_events.py`` checks the scripts emit only these and the table lists exactly them).

Most types are spelled by one script. Two families come from the caller: a failed run's event is its root cause
(:data:`FAILURE_TYPES`, given to ``fail_run``) and a cooled model's is its class (:data:`COOLING_TYPES`, given
to ``rate_limited_run``); the broker refuses any other value before the script runs.
"""

from __future__ import annotations

import enum

__all__ = ["COOLING_TYPES", "FAILURE_TYPES", "EventType"]


class EventType(enum.StrEnum):
    """The ``type`` field of an event."""

    ADDED = "added"  #: a task was queued (or scheduled for later)
    SCHEDULED = "scheduled"  #: a due night-only task waits for the night window again
    DUE = "due"  #: a scheduled task became due and joined its board queue
    CLAIMED = "claimed"  #: a run started
    COMPLETED = "completed"  #: a run's outcome sent its task to review
    FOLLOW_UP = "follow_up"  #: a run's outcome asked for another run: the task is its board head again
    RELEASED = "released"  #: a run was given back without using an attempt
    CANCELLED = "cancelled"  #: an operator cancelled the task
    LOST = "lost"  #: a lease expired whose task hash is gone: its run record was released
    # failures: the run's root cause
    FAILED = "failed"  #: the task failed (a test, a lint error, an agent error)
    TIMEOUT = "timeout"  #: the run timed out, or its lease expired without a heartbeat
    OVERLOADED = "overloaded"  #: the provider was overloaded (5xx, 529)
    UNREACHABLE = "unreachable"  #: the provider could not be reached (connection refused, DNS)
    BILLING = "billing"  #: the account cannot pay
    PAIRING = "pairing"  #: the agent runtime is not paired with this client
    AUTH = "auth"  #: the agent is not logged in, or its key was refused
    AGENT_CONFIG = "agent_config"  #: the model's agent cannot run (no executable, a missing variable)
    AGENT_UNREACHABLE = "agent_unreachable"  #: the agent runtime could not be started or reached
    BAD_OUTPUT = "bad_output"  #: the agent's output broke the protocol
    # cooling: the run's model answered with a limit
    RATE_LIMIT = "rate_limit"  #: a rate limit: the model cools until its reset
    QUOTA_REACHED = "quota_reached"  #: a usage quota: the model cools until its reset
    # models, providers and boards
    COOLDOWN_SET = "cooldown_set"  #: an operator cooled a model
    COOLDOWN_CLEARED = "cooldown_cleared"  #: an operator cleared a model's cooldown
    PROVIDER_OPEN = "provider_open"  #: a provider's breaker opened
    PROVIDER_PROBE = "provider_probe"  #: a half-open breaker let one probe run through
    PROVIDER_CLOSED = "provider_closed"  #: a provider's breaker closed
    PAUSED = "paused"  #: an operator paused a board
    RESUMED = "resumed"  #: an operator resumed a board
    # recurring schedules
    SCHEDULE_ADDED = "schedule_added"  #: a recurring schedule was stored
    SCHEDULE_REMOVED = "schedule_removed"  #: a recurring schedule was deleted
    SCHEDULE_SKIPPED = "schedule_skipped"  #: a firing was skipped: the previous task is unfinished
    SCHEDULE_MISSED = "schedule_missed"  #: a firing came more than one period late and was dropped
    SCHEDULE_FAILED = "schedule_failed"  #: a firing could not add its task
    # the namespace
    CONFIG_LOADED = "config_loaded"  #: a config was loaded (its version in the message)
    DOCTOR = "doctor"  #: a doctor run repaired the derived state


#: The event of a failed run is its root cause: what ``Broker.fail`` accepts as ``cause``.
FAILURE_TYPES = frozenset({
    EventType.FAILED, EventType.TIMEOUT, EventType.OVERLOADED, EventType.UNREACHABLE, EventType.BILLING,
    EventType.PAIRING, EventType.AUTH, EventType.AGENT_CONFIG, EventType.AGENT_UNREACHABLE, EventType.BAD_OUTPUT,
})
#: The event of a run whose model cools (``rate_limited_run``'s class): a limit, or an agent that cannot run.
COOLING_TYPES = frozenset({EventType.RATE_LIMIT, EventType.QUOTA_REACHED, EventType.AUTH, EventType.AGENT_CONFIG})
