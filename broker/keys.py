"""Every Redis key name clawq uses, built in this one module.

All keys of a namespace live under ``clawq:{<namespace>}:`` -- the braces are a Redis Cluster hash tag, so
a namespace occupies exactly one slot and every Lua script may touch any of its keys.  Scripts build the
few keys they only know after deciding (a board's queue, a task's hash) from :attr:`Keys.prefix` with the
same suffixes as the methods below. Nothing outside ``broker/`` names a key (``tests/test_layers.py``), and
the README's keyspace table lists every key built here (``tests/test_keyspace.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["BOARD_RE", "NAMESPACE_RE", "Keys", "chain_key", "model_key"]

#: Board names: letters, digits, ``.``, ``_``, ``-``; 1 to 64 characters (no braces, colons, spaces, ``*``).
BOARD_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}\Z")
#: Namespaces follow the same alphabet, so a namespace can never break out of its hash tag.
NAMESPACE_RE = BOARD_RE


def chain_key(chain: str) -> str:
    """Index key of tasks that run on the fallback chain ``chain``."""
    return f"c:{chain}"


def model_key(model: str) -> str:
    """Index key of tasks pinned to ``model``."""
    return f"m:{model}"


@dataclass(frozen=True)
class Keys:
    """Key builder for one namespace."""

    namespace: str

    @property
    def prefix(self) -> str:
        return f"clawq:{{{self.namespace}}}:"

    def _k(self, *parts: str | int) -> str:
        return self.prefix + ":".join(str(p) for p in parts)

    # -- namespace-wide keys -------------------------------------------------------------------------
    @property
    def meta(self) -> str:
        """HASH: schema_version, created_at."""
        return self._k("meta")

    @property
    def config(self) -> str:
        """STRING: the effective config as JSON (what ``clawq config show`` prints)."""
        return self._k("config")

    @property
    def cfg_settings(self) -> str:
        """HASH: scalar settings the scripts read (version, lease/backoff ms, max attempts, ...)."""
        return self._k("cfg", "settings")

    @property
    def cfg_model_cap(self) -> str:
        """HASH: model -> max inflight (absent: no model cap)."""
        return self._k("cfg", "model_cap")

    @property
    def cfg_provider_cap(self) -> str:
        """HASH: provider -> max inflight (absent: no provider cap)."""
        return self._k("cfg", "provider_cap")

    @property
    def cfg_model_provider(self) -> str:
        """HASH: model -> provider."""
        return self._k("cfg", "model_provider")

    @property
    def cfg_chains(self) -> str:
        """HASH: chain name -> comma-separated models, in fallback order."""
        return self._k("cfg", "chains")

    @property
    def cfg_claim(self) -> str:
        """STRING: what a claim reads of the cfg:* hashes, as one JSON document (``version``, ``lease_ms``,
        ``provider``, ``chains``, ``model_cap``, ``provider_cap``), derived by load_config and doctor --repair:
        a claim reads it with one GET instead of an HMGET, two HGETALLs and two HGETs."""
        return self._k("cfg", "claim")

    @property
    def task_seq(self) -> str:
        """STRING counter: the highest task id handed out or given."""
        return self._k("seq", "task")

    @property
    def ready_seq(self) -> str:
        """STRING counter: round-robin position of boards joining a ready line."""
        return self._k("seq", "ready")

    @property
    def boards(self) -> str:
        """SET: every board name that ever had a task."""
        return self._k("boards")

    @property
    def running(self) -> str:
        """ZSET: task id -> lease deadline (ms) of every in-progress task; the reaper sweeps it."""
        return self._k("running")

    @property
    def in_review(self) -> str:
        """ZSET: task id -> time (ms) it reached in_review."""
        return self._k("status", "in_review")

    @property
    def failed(self) -> str:
        """ZSET: task id -> time (ms) it failed for good."""
        return self._k("status", "failed")

    @property
    def cancelled(self) -> str:
        """ZSET: task id -> time (ms) it was cancelled."""
        return self._k("status", "cancelled")

    @property
    def scheduled(self) -> str:
        """ZSET: task id -> time (ms) it becomes due, for every ``scheduled`` task (waiting for its not-before
        time or for the night window); a claim moves the due ones to their board queues."""
        return self._k("scheduled")

    @property
    def night_queued(self) -> str:
        """ZSET: task id -> task id, night-only tasks that went to a board queue (cleaned lazily: a claim made
        outside the night window moves the queued ones back to ``scheduled`` and drops the finished ones)."""
        return self._k("night_queued")

    @property
    def schedules(self) -> str:
        """ZSET: recurring schedule id -> its next firing time (ms); a firing moves it on, atomically."""
        return self._k("schedules")

    @property
    def schedule_seq(self) -> str:
        """STRING counter: the highest schedule id handed out."""
        return self._k("seq", "schedule")

    def schedule(self, schedule_id: int) -> str:
        """HASH: a recurring schedule: cron, tz, board, ck, title, prompt, created_at, last_task, last_fire,
        fired, skipped, missed."""
        return self._k("schedule", schedule_id)

    @property
    def inflight_model(self) -> str:
        """HASH: model -> runs in progress (a field at 0 stays; 0 and absent mean the same)."""
        return self._k("inflight", "model")

    @property
    def inflight_provider(self) -> str:
        """HASH: provider -> runs in progress (a field at 0 stays; 0 and absent mean the same)."""
        return self._k("inflight", "provider")

    @property
    def blocked(self) -> str:
        """HASH: why a model may not take a task, kept as caps are crossed and cooldowns set:
        ``m:<model>`` / ``p:<provider>`` -> the quota reason, ``c:<model>`` -> ``<until_ms>|<reason>``,
        ``o:<provider>`` -> ``<until_ms>|<probe run id>`` while the provider's breaker is not closed."""
        return self._k("blocked")

    @property
    def ready_fronts(self) -> str:
        """ZSET: chain key (``c:<chain>`` / ``m:<model>``) -> the place of its ready line's front board, for the
        lines that are not empty (a claim reads every line's front in one call)."""
        return self._k("ready", "fronts")

    def ready(self, ck: str) -> str:
        """ZSET: board -> round-robin position, for boards whose head runs on chain key ``ck``."""
        return self._k("ready", ck)

    @property
    def idx_busy(self) -> str:
        """SET: boards with a task in progress and more queued."""
        return self._k("idx", "busy")

    @property
    def idx_paused(self) -> str:
        """SET: paused boards with queued work."""
        return self._k("idx", "paused")

    @property
    def idx_backoff(self) -> str:
        """ZSET: board -> time (ms) its head's failure backoff ends."""
        return self._k("idx", "backoff")

    @property
    def refs(self) -> str:
        """HASH: chain key -> number of unfinished tasks that use it (config load checks it)."""
        return self._k("refs")

    @property
    def events(self) -> str:
        """STREAM: typed events, capped."""
        return self._k("events")

    @property
    def errors(self) -> str:
        """LIST: the latest actionable errors as JSON, newest first, capped."""
        return self._k("errors")

    @property
    def stats_skips(self) -> str:
        """HASH: skip reason -> boards refused, summed over every refused claim."""
        return self._k("stats", "skips")

    @property
    def stats_claims(self) -> str:
        """STRING counter: successful claims."""
        return self._k("stats", "claims")

    @property
    def stats_failures(self) -> str:
        """HASH: ``<model>|<reason>`` -> failed runs (timeout, rate_limit, quota_reached, failed)."""
        return self._k("stats", "failures")

    @property
    def stats_claim_to_start(self) -> str:
        """HASH: histogram of claim-to-start seconds: bucket bound -> count (not cumulative), sum, count."""
        return self._k("stats", "claim_to_start")

    @property
    def stats_completed(self) -> str:
        """HASH: board -> outcomes recorded before they were counted in ``board:<b>`` ``completed``: read and added
        to those by :meth:`Broker.counters`, never written, so a counter never goes back after an upgrade."""
        return self._k("stats", "completed")

    @property
    def stats_agent_tokens(self) -> str:
        """HASH: ``<model>|<board>|<kind>`` -> tokens the agent CLIs reported (kind: input, output)."""
        return self._k("stats", "agent_tokens")

    @property
    def stats_agent_cost(self) -> str:
        """HASH: ``<model>|<board>`` -> US dollars the agent CLIs reported (HINCRBYFLOAT)."""
        return self._k("stats", "agent_cost")

    @property
    def stats_agent_cost_hourly(self) -> str:
        """HASH: ``<hour start, epoch s>|<model>`` -> dollars reported in that hour (the night's cost; fields
        older than two days are dropped by the writer)."""
        return self._k("stats", "agent_cost_hourly")

    @property
    def agent_gate(self) -> str:
        """STRING with TTL: set while the agent runtime is known to be down (no claims meanwhile)."""
        return self._k("gate", "agent")

    @property
    def summary_lock(self) -> str:
        """STRING with TTL: taken by the dispatcher that sends this interval's summary."""
        return self._k("lock", "summary")

    @property
    def outage_lock(self) -> str:
        """STRING with TTL: why the agent runtime is not ready; taken by the dispatcher that sends the outage
        alert (one per outage across dispatchers), deleted by the one that sees it end."""
        return self._k("lock", "outage")

    def wiped_lock(self, identity: str) -> str:
        """STRING with TTL: the previous identity of a namespace found wiped; taken by the one dispatcher that
        sends the alert for the namespace re-created as ``identity``."""
        return self._k("lock", "wiped", identity)

    def notified(self, event_id: str) -> str:
        """STRING with TTL: this event's alert was sent (one per event across dispatchers)."""
        return self._k("notified", event_id)

    # -- per-board keys ------------------------------------------------------------------------------
    def board(self, board: str) -> str:
        """HASH: running (task id; "" or absent: none, since a run's end empties it in the one HSET that writes
        the board's state), run (``<run id>|<model>|<provider>`` of that task's run: what the reaper releases
        if the task hash is gone; emptied with running), paused, ck (ready line it sits in; left stale, and
        ignored, while state is not ready), state (index it sits in), scheduled (its tasks in ``scheduled``),
        completed (outcomes recorded: kept here, not in one hash of every board, so a complete costs O(1) at any
        number of boards)."""
        return self._k("board", board)

    def queue(self, board: str) -> str:
        """ZSET: task id -> task id, the board's up_next tasks; the lowest is the head."""
        return self._k("board", board, "queue")

    def done(self, board: str) -> str:
        """ZSET: run id -> time (ms) of each outcome in the last 24 h (throughput), and at most 63 older ones: a
        complete trims it every 64th outcome of the board. Read by time range (ZCOUNT), never by ZCARD."""
        return self._k("board", board, "done")

    # -- per-task keys -------------------------------------------------------------------------------
    def task(self, task_id: int) -> str:
        """HASH: the task's fields. add_task writes board, title, ck, status, ``at`` (when it was added, ms: the
        task's created_at) and prompt when not empty, and when given not_before, night ("1": night-only), due_at
        (while scheduled) and schedule (the schedule that fired it); the runs add run_id, model, provider,
        claimed_at, lease_deadline, probe ("1" while the run is its provider's half-open probe, else "0"; gone
        with the run), night_run ("1" when claimed inside the night window, else "0"; gone with the run: the
        run's history entry is written from these fields at its end), run_count, attempts, … . A field left
        out has its default: id is the key's, chain / pinned model are in ck (``c:<chain>`` / ``m:<model>``),
        prompt is "", run_count, attempts and backoff_until are 0, updated_at and queued_at are ``at``. There is
        no index of every task: each one is in exactly one place (``scheduled``, a board queue, ``running`` or a
        status ZSET), and ids run from 1 to ``seq:task``."""
        return self._k("task", task_id)

    def runs(self, task_id: int) -> str:
        """LIST: run history, JSON entries, oldest first, each written once when its run ends (a run claimed
        by an older version pushed an open entry at its claim, closed at its end). ``get_task`` adds the active
        run as the last entry, from the task hash."""
        return self._k("task", task_id, "runs")

    def context(self, task_id: int) -> str:
        """LIST: accumulated follow-up prompts and summaries, JSON entries, oldest first."""
        return self._k("task", task_id, "context")

    def run_log(self, task_id: int) -> str:
        """HASH: run id -> the tail of that run's agent log."""
        return self._k("task", task_id, "log")

    def run_meta(self, task_id: int) -> str:
        """HASH: run id -> JSON ``{"session_id", "usage": {input_tokens, output_tokens, cost_usd}}`` that the
        run's agent CLI reported (``show`` merges it into the run's history entry)."""
        return self._k("task", task_id, "meta")

    def notified_model(self, kind: str, model: str) -> str:
        """STRING with TTL: the ``kind`` alert of ``model`` (auth) was sent for its current cooldown."""
        return self._k("notified", kind, model)

    def lease(self, task_id: int) -> str:
        """STRING with TTL: the active run id while its lease is fresh (readable with PTTL)."""
        return self._k("task", task_id, "lease")

    def cooldown(self, model: str) -> str:
        """STRING with TTL: ``<until_ms>|<reason>`` while ``model`` cools down."""
        return self._k("cooldown", model)

    # -- per-provider keys ---------------------------------------------------------------------------
    def breaker(self, provider: str) -> str:
        """HASH, present while ``provider``'s breaker is not closed: until (ms; open before it, half-open
        after it), cooldown_ms (this opening's length), cause, opened_at, and probe / probe_task (the run
        id and task of the half-open probe while it runs)."""
        return self._k("breaker", provider)

    def breaker_failures(self, provider: str) -> str:
        """ZSET with TTL: run id -> time (ms) of each qualifying failure of ``provider`` in the breaker's
        sliding window, while the breaker is closed."""
        return self._k("breaker", provider, "failures")
