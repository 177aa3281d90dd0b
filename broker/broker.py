"""The typed broker API: every queue operation is one Lua script call.

The CLI, the workers, the simulator and the HTTP layer all go through :class:`Broker`; it holds no queue
rule of its own (those live in ``lua/``), only argument checks, time, and the mapping of replies to values.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any, cast

import redis

from .breaker import BreakerState, check_open_minutes, state_from
from .checks import (
    MAX_TEXT_BYTES,
    MAX_TITLE_BYTES,
    check_board,
    check_namespace,
    check_run_id,
    check_task_id,
    check_text,
)
from .config import DEFAULT_CONFIG, Config, parse_config
from .connection import Client, client_from_url, client_url, pipelined
from .decode import event, skips, task_from, text, texts, to_str, with_open_run, xread_rows
from .doctor import doctor_report, parse_reply
from .errors import (
    ClawqError,
    ConfigError,
    ConfigInUse,
    ConfigMissing,
    InputError,
    NamespaceWiped,
    NothingToClaim,
    RedisUnavailable,
    SchemaMismatch,
    ScriptError,
    Status,
    TaskNotFound,
    UnknownChain,
    error_for,
)
from .events import COOLING_TYPES, FAILURE_TYPES
from .health import Health, collect_health
from .identity import MetaFields, NamespaceInfo, new_identity
from .keys import Keys
from .memory import MemoryState, read_memory
from .models import Added, Claim, Completion, Deadlines, Outcome, Task, TaskStatus
from .redact import redact_url
from .scripts import Scripts, load_specs
from .signals import MAX_RESET_SECONDS, SignalClass, counts_for_breaker, parse_signal, root_cause
from .stats import Counters, counters_from, observe_claim_to_start, queue_claim_to_start
from .timing import parse_not_before, start_of
from .translate import redis_errors
from .usage import cost_since, queue_usage, read_usage_stats, stale_hours, usage_doc

__all__ = ["SCHEMA_VERSION", "Broker"]

#: Layout version of a namespace's keys; written to the meta hash on first use, checked on connect.
#: 2: lean task hashes (``at``, derived fields left out), no ``tasks`` zset, the ``blocked`` model index.
SCHEMA_VERSION = 2
#: Leases the reaper handles per script call (it loops until none is left).
REAP_BATCH = 500
#: The most claims one claim_many call makes.
MAX_CLAIM_BATCH = 64
#: Outcomes per complete_runs call in ``complete_many`` (the calls of one batch share a round trip).
COMPLETE_BATCH = 64
#: Task hashes read per pipeline by ``list_tasks``.
LIST_BATCH = 1000
#: complete_many's place holder for an item whose reply is still to come.
_PENDING = ClawqError("no reply")
_log = logging.getLogger("clawq.broker")


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class Broker:
    """One namespace of one Redis: add tasks, claim them, report on runs."""

    def __init__(
        self,
        client: Client,
        namespace: str = "default",
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        check_namespace(namespace)
        self.client = client
        self.namespace = namespace
        self.keys = Keys(namespace)
        self.clock = clock
        self._where = redact_url(client_url(client))
        self._scripts = Scripts(cast(redis.Redis, client), self.keys)  # a RedisCluster has the same surface
        self._config: Config | None = None
        self._config_version = ""
        self._ready = False
        self._identity: str | None = None  #: the namespace id this broker knows (None: none seen yet)
        self._stored_config: Config | None = None  #: the last config read from Redis that was stored there
        #: called with every NamespaceWiped this broker notices (a daemon logs it); see :meth:`_observe_identity`
        self.on_wipe: Callable[[NamespaceWiped], None] | None = None

    @classmethod
    def from_url(cls, url: str, namespace: str = "default", *, lean: bool = False, **kwargs: Any) -> Broker:
        """Connect to ``url`` and check the namespace's schema.

        ``url``: redis://, rediss://, unix://, a cluster (``redis+cluster://host:port[,host:port...]/``) or
        a Sentinel-managed primary (``redis+sentinel://host:port[,host:port...]/<service>[/<db>]``); see
        :mod:`broker.connection`. ``lean``: new connections send no handshake (RESP2, no CLIENT SETINFO, no
        maintenance notifications): a worker's forked jobs each open one.
        """
        with redis_errors(redact_url(url)):
            client = client_from_url(url, lean=lean)
        broker = cls(client, namespace, **kwargs)
        broker.connect()
        return broker

    # -- setup -----------------------------------------------------------------------------------
    def connect(self) -> None:
        """Check the namespace's schema version and learn its identity (a new namespace is written on its
        first change; a namespace written before identities gets one now, and one whose config was loaded
        before ``cfg:claim`` existed gets that now)."""
        with redis_errors(self._where):
            pipe = self.client.pipeline(transaction=False)
            pipe.hmget(self.keys.meta, [MetaFields.SCHEMA, MetaFields.ID])
            pipe.exists(self.keys.config, self.keys.cfg_settings)
            pipe.exists(self.keys.cfg_claim)
            (found, ident), has_config, has_compiled = pipe.execute()
        if found is not None:
            self._check_schema(found)
            if ident is None:
                ident = self._write_identity()
            if has_config == 2 and not has_compiled:
                self._store_config(DEFAULT_CONFIG, only_if_absent=True)  # a config is loaded: writes cfg:claim
        self._identity = None if ident is None else to_str(ident)

    @property
    def identity(self) -> str | None:
        """The namespace id this broker knows (None before it saw one)."""
        return self._identity

    def _write_identity(self, extra: dict[str, Any] | None = None) -> str:
        """Give the namespace its id and creation time unless it has them (and ``extra`` meta fields, always);
        returns the id it has. One MULTI: concurrent writers agree on the first id."""
        with redis_errors(self._where):
            pipe = self.client.pipeline(transaction=True)
            pipe.hsetnx(self.keys.meta, MetaFields.SCHEMA, SCHEMA_VERSION)
            pipe.hsetnx(self.keys.meta, MetaFields.ID, new_identity())
            pipe.hsetnx(self.keys.meta, MetaFields.CREATED_AT, _ms(self.now()))
            if extra:
                pipe.hset(self.keys.meta, mapping=cast(Any, extra))
            pipe.hmget(self.keys.meta, [MetaFields.SCHEMA, MetaFields.ID])
            *_, (schema, ident) = pipe.execute()
        self._check_schema(schema)
        return to_str(ident)

    def _observe_identity(self, found: Any, *, strict: bool) -> None:
        """Compare the namespace id just read with the one this broker knows. A change (or a vanished id)
        means the namespace was wiped: tell ``on_wipe``, remember the new id (so it is said once), and raise
        NamespaceWiped when ``strict`` (a caller about to act on the namespace must stop and recover)."""
        current = None if found is None else to_str(found)
        known = self._identity
        if known is None or current == known:
            self._identity = current if known is None else known
            return
        if current is None and self._meta_evicted(known):
            return
        self._identity = current
        err = NamespaceWiped(self.namespace, known, current, self._stored_config)
        if self.on_wipe is not None:
            self.on_wipe(err)
        if strict:
            raise err

    def _meta_evicted(self, known: str) -> bool:
        """The id vanished but (some of) the namespace's config is still there: only ``meta`` went (evicted under
        an ``allkeys-*`` policy, or deleted), not the namespace. A config is only ever written after the id
        (:meth:`_ensure_ready`, :meth:`recreate`), so a wipe takes both. Puts the id this broker knew back
        (HSETNX: a concurrent writer's id wins) and returns True; False when it is a wipe after all."""
        with redis_errors(self._where):
            if not self.client.exists(self.keys.config, self.keys.cfg_settings, self.keys.cfg_claim,
                                      self.keys.cfg_chains, self.keys.cfg_model_provider):
                return False
            pipe = self.client.pipeline(transaction=True)
            pipe.hsetnx(self.keys.meta, MetaFields.SCHEMA, SCHEMA_VERSION)
            pipe.hsetnx(self.keys.meta, MetaFields.ID, known)
            pipe.hget(self.keys.meta, MetaFields.ID)
            *_, ident = pipe.execute()
        if to_str(ident) != known:  # someone re-created it meanwhile: that is a wipe this broker missed
            return False
        _log.warning("namespace %r lost its meta hash (evicted or deleted) while its config remained: not a "
                     "wipe; its id %s was written back", self.namespace, known)
        return True

    def check_identity(self) -> None:
        """Raise NamespaceWiped when the namespace's id is not the one this broker knows (one HGET)."""
        with redis_errors(self._where):
            found = self.client.hget(self.keys.meta, MetaFields.ID)
        self._observe_identity(found, strict=True)

    def namespace_info(self) -> NamespaceInfo:
        """What the ``meta`` hash says: id, creation time, and whether (and when) the namespace was re-created."""
        with redis_errors(self._where):
            meta = texts(self.client.hgetall(self.keys.meta))
        self._observe_identity(meta.get(MetaFields.ID), strict=False)
        return NamespaceInfo.from_meta(meta)

    def recreate(self, previous: str, config: Config | None, noticed_by: str) -> str:
        """After a wipe: set the namespace up again, record that it was re-created (when, from which id, by
        whom), and restore ``config`` (the last one this process knew) unless someone stored another since
        (a config other than the defaults that a fresh command seeds). Never seeds the defaults itself.
        Returns what it did with the config, for the log."""
        ident = self._write_identity({MetaFields.RECREATED_AT: _ms(self.now()), MetaFields.PREVIOUS_ID: previous,
                                      MetaFields.NOTICED_BY: noticed_by})
        self._identity = ident
        self._ready = True
        self._config = None
        with redis_errors(self._where):
            raw = self.client.get(self.keys.config)
        if config is None:
            return "no config to restore (this process never read a stored one)"
        if raw is None:
            version = self._store_config(config, only_if_absent=True)
            return f"restored the last config it knew (now version {version})"
        current = parse_config(json.loads(text(raw)))
        if current == DEFAULT_CONFIG and config != DEFAULT_CONFIG:
            try:
                version = self._store_config(config, only_if_absent=False)
            except ConfigInUse as err:  # tasks added since the wipe use a chain the old config lacks
                return (f"could NOT restore the last config it knew ({err}); the defaults a command seeded stay: "
                        "load the config again with `clawq config load`")
            return f"restored the last config it knew over the defaults a command seeded (now version {version})"
        return "kept the config stored since the wipe" if current != config else "the config was restored already"

    def _check_schema(self, found: Any) -> None:
        if str(text(found)) != str(SCHEMA_VERSION):
            raise SchemaMismatch(
                f"namespace {self.namespace!r} has schema version {text(found)}, this clawq speaks "
                f"{SCHEMA_VERSION}: use the clawq version that wrote it, or another namespace"
            )

    def _ensure_ready(self) -> None:
        """Before the first change: write the schema version, the identity and the seed config if there are
        none. Done once per broker: a broker that set a namespace up (or saw its config) never seeds it again,
        so a namespace wiped under a running process is noticed (:meth:`_observe_identity`), not re-seeded."""
        if self._ready:
            return
        if self._config is not None and self._config_version:  # a stored config: the namespace exists
            self._ready = True
            return
        ident = self._write_identity()
        self._observe_identity(ident, strict=True)
        self._store_config(DEFAULT_CONFIG, only_if_absent=True)
        self._ready = True

    def close(self) -> None:
        self.client.close()

    def now(self) -> float:
        return self.clock()

    def _now_arg(self) -> str | int:
        """The scripts' clock: "" (the Redis server's TIME) with the real clock, the fake one's ms in tests."""
        return "" if self.clock is time.time else _ms(self.clock())

    def _call(self, name: str, args: list[str | int | float], **kw: Any) -> list[Any]:
        self._ensure_ready()
        with redis_errors(self._where):
            return self._scripts.call(name, [self.keys.prefix, *args], **kw)

    # -- config ----------------------------------------------------------------------------------
    def config(self) -> Config:
        """The effective config (read from Redis; cached until a claim sees a newer version)."""
        if self._config is None:
            self._reload_config()
        assert self._config is not None
        return self._config

    def forget_config(self) -> None:
        """Drop the cached config: the next read takes the one in Redis (after a `config_loaded` event)."""
        self._config = None

    def _reload_config(self) -> None:
        """Read the stored config, its version and the namespace id (one MULTI); raises NamespaceWiped (after
        taking what is there now) when the namespace this broker knew is gone."""
        with redis_errors(self._where):
            pipe = self.client.pipeline(transaction=True)
            pipe.get(self.keys.config)
            pipe.hget(self.keys.cfg_settings, "version")
            pipe.hget(self.keys.meta, MetaFields.ID)
            raw, version, ident = pipe.execute()
        if raw is None:  # nothing stored yet: the seed applies (written on the first change)
            # a version without its JSON is a damaged namespace (evicted or deleted key; doctor says so): take
            # that version, so reads checked against it go on instead of reloading forever
            self._config, self._config_version = DEFAULT_CONFIG, "" if version is None else str(text(version))
        else:
            try:
                self._config = parse_config(json.loads(text(raw)))
            except (ValueError, ConfigError) as err:
                raise ScriptError(f"the config stored in Redis is unreadable: {err}") from None
            # "" when the settings hash is gone (evicted) while the JSON remains: as the scripts see it
            self._config_version = "" if version is None else str(text(version))
            self._stored_config = self._config
        self._observe_identity(ident, strict=True)

    def load_config(self, config: Config) -> int:
        """Make ``config`` the effective config of the namespace; returns its version."""
        self._ensure_ready()
        return self._store_config(config, only_if_absent=False)

    def _store_config(self, config: Config, *, only_if_absent: bool) -> int:
        args: list[str | int | float] = [
            _ms(self.now()),
            config.to_json(),
            json.dumps(config.script_settings()),
            json.dumps(config.limits.model_max_inflight),
            json.dumps(config.limits.provider_max_inflight),
            json.dumps(config.models),
            json.dumps(config.chains),
            int(only_if_absent),
            self.keys.prefix,
        ]
        with redis_errors(self._where):
            reply = self._scripts.call("load_config", args)
        status = Status(reply[0])
        if status is not Status.OK:
            raise error_for(status, 0, "", str(reply[1]))
        self._config = None
        if not only_if_absent:
            self._stored_config = config  # what a restore after a wipe gives back
        return int(reply[1])

    # -- tasks -----------------------------------------------------------------------------------
    def add(
        self,
        board: str,
        title: str,
        *,
        chain: str | None = None,
        model: str | None = None,
        prompt: str = "",
        task_id: int | None = None,
        not_before: float | None = None,
        night_only: bool = False,
    ) -> int:
        """Queue a task on ``board`` (its place is its id); returns the task id. See :meth:`add_task`."""
        return self.add_task(board, title, chain=chain, model=model, prompt=prompt, task_id=task_id,
                             not_before=not_before, night_only=night_only).task_id

    def add_task(
        self,
        board: str,
        title: str,
        *,
        chain: str | None = None,
        model: str | None = None,
        prompt: str = "",
        task_id: int | None = None,
        not_before: float | None = None,
        night_only: bool = False,
    ) -> Added:
        """Queue a task on ``board`` (its place is its id): its id, status (up_next or scheduled) and due time.

        ``not_before`` (epoch s): the task waits as ``scheduled`` until then. ``night_only`` (or the board's
        ``night_only`` option): it may only start inside the night window, and waits for it as ``scheduled``.
        """
        check_board(board)
        check_text("title", title, MAX_TITLE_BYTES, required=True)
        check_text("prompt", prompt, MAX_TEXT_BYTES)
        if (chain is None) == (model is None):
            raise InputError("give exactly one of --chain or --model")
        if task_id is not None:
            check_task_id(task_id)
        self._check_known(chain=chain, model=model)
        for _ in range(3):
            start = start_of(self.config(), board, self.now(), not_before=not_before, night_only=night_only)
            args: list[str | int | float] = [
                self._now_arg(), "" if task_id is None else task_id, board, title, prompt,
                chain or "", model or "", "" if start.due is None else _ms(start.due),
                "1" if start.night_only else "", "" if start.not_before is None else _ms(start.not_before),
                self._config_version,
            ]
            reply = self._call("add_task", args)
            status = Status(reply[0])
            if status is not Status.CONFIG_STALE:
                break
            self._config = None
        else:
            raise ScriptError("the config kept changing during the add; try again")
        if status is Status.BAD_STATE:
            raise InputError(str(reply[1]))
        if status is not Status.OK:
            raise error_for(status, int(task_id or 0), "", str(reply[1]))
        scheduled = str(reply[2]) == TaskStatus.SCHEDULED
        return Added(task_id=int(reply[1]), status=TaskStatus(str(reply[2])),
                     due_at=start.due if scheduled else None)

    def parse_time(self, text: str) -> float:
        """A not-before time as epoch seconds: ISO 8601, or ``HH:MM`` (the next such time in the night window's
        zone, UTC without night mode). Raises InputError."""
        return parse_not_before(text, self.config(), self.now())

    def _check_known(self, *, chain: str | None = None, model: str | None = None) -> None:
        """Refuse an unknown chain or model before anything is written (the scripts check again, atomically).

        Only the config in Redis now refuses: a name the cached config lacks is checked again after a reload,
        so a chain that another process has just loaded is never refused here.
        """
        for fresh in (False, True):
            if fresh:
                self._reload_config()
            cfg = self.config()
            if chain is not None and chain not in cfg.chains:
                unknown = f"unknown chain {chain!r}"
            elif model is not None and model not in cfg.models:
                unknown = f"unknown model {model!r}"
            else:
                return
        raise UnknownChain(unknown)

    def claim(self) -> Claim:
        """Claim the next task that may run now; raises NothingToClaim with the skip reasons."""
        return self.claim_many(1)[0][0]

    def claim_many(self, limit: int) -> tuple[list[Claim], dict[str, int]]:
        """Claim up to ``limit`` tasks in one atomic call, each the next that may run (as :meth:`claim` would
        give one after another). Returns at least one claim and, when the rules stopped the batch short of
        ``limit``, the skip reasons of the boards left waiting (as a refused claim gives them); with no claim
        at all, raises NothingToClaim."""
        if not 1 <= limit <= MAX_CLAIM_BATCH:
            raise InputError(f"bad claim batch {limit!r}: 1 to {MAX_CLAIM_BATCH}")
        for _ in range(3):
            now = self.now()
            cfg = self.config()
            cap, night = cfg.global_cap_at(now)
            night_next = cfg.night_next(now)
            run_ids = [str(uuid.uuid4()) for _ in range(limit)]
            args: list[str | int | float] = [self._now_arg(), run_ids[0], cap, int(night), self._config_version,
                                             "" if night_next is None else _ms(night_next), *run_ids[1:]]
            try:
                reply = self._call("claim_task", args)
            except ConfigMissing:
                self._config = None
                self.config()  # a wipe (NamespaceWiped) before a lost config, as for a stale version below
                raise
            status = Status(reply[0])
            if status is Status.CONFIG_STALE:
                self._config = None
                self.config()  # reloads; raises NamespaceWiped when the namespace's identity changed
                if not self._config_version:
                    raise ConfigMissing(f"namespace {self.namespace!r} has no config settings (wiped, flushed or "
                                        "evicted): a dispatcher restores the last config it knew; else load one "
                                        "with `clawq config load`")
                continue
            if status is Status.NOTHING:
                raise NothingToClaim(skips(reply[1:]))
            n = int(reply[1])
            claims = [
                Claim(task_id=int(r[0]), board=r[1], model=r[2], provider=r[3], run_id=r[4], run_count=int(r[5]),
                      attempt=int(r[6]), lease_deadline=int(r[7]) / 1000)
                for r in (reply[i:i + 8] for i in range(2, 2 + 8 * n, 8))
            ]
            return claims, skips(reply[2 + 8 * n:])
        raise ScriptError("the config kept changing during the claim; try again")

    def _run_call(self, name: str, task_id: int, run_id: str, args: list[str | int | float]) -> list[Any]:
        check_task_id(task_id)
        check_run_id(run_id)
        reply = self._call(name, [self._now_arg(), task_id, run_id, *args], task_id=task_id)
        status = Status(reply[0])
        if status not in (Status.OK, Status.REPEATED):
            raise error_for(status, task_id, run_id, str(reply[1]))
        return reply

    def heartbeat(self, task_id: int, run_id: str) -> float:
        """Extend the run's lease; returns the new deadline (epoch seconds). Raises RunFenced."""
        check_task_id(task_id)
        check_run_id(run_id)
        reply = self._call("heartbeat", [self._now_arg(), task_id, run_id], task_id=task_id)
        return self._beat_deadline(reply, task_id, run_id)

    @staticmethod
    def _beat_deadline(reply: list[Any], task_id: int, run_id: str) -> float:
        status = Status(reply[0])
        if status is not Status.OK:
            raise error_for(status, task_id, run_id, str(reply[1]))
        return int(reply[1]) / 1000

    def start_run(self, task_id: int, run_id: str, waited_s: float | None = None) -> tuple[Task, Config]:
        """Start a claimed run in one round trip (MULTI): beat as :meth:`heartbeat` (raises RunFenced, or
        TaskNotFound), record ``waited_s`` in the claim-to-start histogram, read the config version and the
        task (without its runs' log tails: the agent is not given them, and they can be long). Returns the task and
        the config of that version (the cached one unless the version changed). On a cluster, whose pipelines
        refuse EVALSHA, the beat is a second round trip."""
        check_task_id(task_id)
        check_run_id(run_id)
        args: list[str | int | float] = [self.keys.prefix, self._now_arg(), task_id, run_id]
        inline = isinstance(self.client, redis.Redis)
        with redis_errors(self._where):
            pipe = self.client.pipeline(transaction=True)
            if inline:
                keys = self._scripts.keys_for("heartbeat", task_id=task_id)
                pipe.evalsha(self._sha("heartbeat"), len(keys), *keys, *args)
            pipe.hget(self.keys.cfg_settings, "version")
            self._queue_task_reads(pipe, task_id, logs=False)
            if waited_s is not None:
                queue_claim_to_start(pipe, self.keys, waited_s)
            replies = pipe.execute(raise_on_error=False)
            for err in replies:
                if isinstance(err, Exception) and not isinstance(err, redis.exceptions.NoScriptError):
                    raise err
            beat = replies.pop(0) if inline else None
            if beat is None or isinstance(beat, Exception):  # a cluster, or NOSCRIPT: the wrapper (re)loads it
                beat = self._scripts.call("heartbeat", args, task_id=task_id)
        self._beat_deadline([text(x) for x in beat], task_id, run_id)
        version, fields, context, runs, meta = replies[:5]
        task = self._task_from_reads(task_id, fields, context, runs, None, meta)
        return task, self.config_of("" if version is None else str(text(version)))

    def config_of(self, version: str) -> Config:
        """The config of ``version`` (its ``cfg_settings`` version, "" for none stored): the cached one if it is
        that version, else the one in Redis now."""
        if self._config is None or version != self._config_version:
            self._reload_config()
        return self.config()

    @property
    def config_version(self) -> str:
        """The version of the cached config ("" when none is cached or stored); a claim checks it is current."""
        return self._config_version if self._config is not None else ""

    def assume_ready(self) -> None:
        """Never seed this namespace: a worker's broker serves runs that a claim made, so it is set up."""
        self._ready = True

    @staticmethod
    @cache
    def _sha(name: str) -> str:
        """The SHA1 of a script's source, what EVALSHA names it by (the wrapper registers the same source)."""
        return hashlib.sha1(load_specs()[name].source.encode("utf-8")).hexdigest()


    def complete(self, task_id: int, run_id: str, outcome: Outcome) -> Completion:
        """Record the run's outcome: follow-up back to the board head, else in_review."""
        reply = self._run_call("complete_run", task_id, run_id, _complete_args(outcome))
        return self._completion(task_id, reply)

    def complete_many(self, items: Sequence[tuple[int, str, Outcome]]) -> list[Completion | ClawqError]:
        """Record many runs' outcomes in one round trip: complete_runs calls of up to COMPLETE_BATCH outcomes each,
        every outcome recorded as :meth:`complete` records it (each one fenced by its own run id). Each item, in
        order, gets what :meth:`complete` would give it: its Completion, or the ClawqError :meth:`complete` would
        raise (RunFenced, TaskNotFound, InputError...). Only a Redis that cannot be reached raises
        (RedisUnavailable); then some of the items may have been recorded, as a lost reply to :meth:`complete`
        leaves it unknown, and completing them again is answered as a repeat. An error of a whole call (one no
        outcome causes: Redis refused the script) is every item's of that call."""
        results: list[Completion | ClawqError] = []
        calls: list[tuple[int, int, str, list[str | int | float]]] = []
        for task_id, run_id, outcome in items:
            try:
                check_task_id(task_id)
                check_run_id(run_id)
            except ClawqError as err:
                results.append(err)
                continue
            calls.append((len(results), task_id, run_id, _complete_args(outcome)))
            results.append(_PENDING)
        chunks = [calls[i:i + COMPLETE_BATCH] for i in range(0, len(calls), COMPLETE_BATCH)]
        for chunk, replies in zip(chunks, self._batched_runs("complete_runs", chunks), strict=True):
            for (i, task_id, run_id, _), reply in zip(chunk, replies, strict=True):
                results[i] = (reply if isinstance(reply, ClawqError)
                              else self._completion_or_error(task_id, run_id, reply))
        return results

    def _completion_or_error(self, task_id: int, run_id: str, reply: list[Any]) -> Completion | ClawqError:
        status = Status(reply[0])
        if status not in (Status.OK, Status.REPEATED):
            return error_for(status, task_id, run_id, str(reply[1]))
        return self._completion(task_id, reply)

    def _batched_runs(
        self, name: str, chunks: list[list[tuple[int, int, str, list[str | int | float]]]]
    ) -> list[list[list[Any] | ClawqError]]:
        """Run batch script ``name`` once per chunk of (index, task id, run id, args), all in one round trip;
        per chunk, each item's reply, or the ClawqError its chunk's call met."""
        self._ensure_ready()
        now = self._now_arg()
        argvs = [[now, *(v for _, task_id, run_id, args in chunk for v in (task_id, run_id, *args))]
                 for chunk in chunks]
        if not isinstance(self.client, redis.Redis):  # a cluster's pipelines refuse EVALSHA: one call after another
            return [self._chunk_replies(name, argv, len(chunk)) for argv, chunk in zip(argvs, chunks, strict=True)]
        sha, keys = self._sha(name), self._scripts.keys_for(name)
        with redis_errors(self._where):
            replies = pipelined(self.client, [["EVALSHA", sha, len(keys), *keys, self.keys.prefix, *argv]
                                              for argv in argvs])
        out: list[list[list[Any] | ClawqError]] = []
        for argv, chunk, reply in zip(argvs, chunks, replies, strict=True):
            if isinstance(reply, redis.exceptions.NoScriptError):  # the wrapper (re)loads it
                out.append(self._chunk_replies(name, argv, len(chunk)))
            elif isinstance(reply, Exception):
                out.append([_translated(reply, self._where)] * len(chunk))
            else:
                out.append(_item_replies(reply))
        return out

    def _chunk_replies(self, name: str, argv: list[Any], n: int) -> list[list[Any] | ClawqError]:
        """One batch call through the script wrapper: its items' replies, or the ClawqError it met for each of
        its ``n`` items (RedisUnavailable still raises)."""
        try:
            reply = self._call(name, argv)
        except RedisUnavailable:
            raise
        except ClawqError as err:
            return [err] * n
        return _item_replies(reply)

    @staticmethod
    def _completion(task_id: int, reply: list[Any]) -> Completion:
        repeated = Status(reply[0]) is Status.REPEATED
        note = "" if repeated else str(reply[3])
        return Completion(
            task_id=task_id, status=TaskStatus(reply[1]), run_count=int(reply[2]), repeated=repeated,
            note=note,
        )

    def fail(
        self, task_id: int, run_id: str, reason: str, *, retry: bool = True, cause: str | None = None
    ) -> tuple[TaskStatus, int]:
        """Record a failed run; returns the task's status and attempts afterwards.

        ``cause`` is the root cause (timeout, overloaded, …); by default it is read from ``reason``.
        """
        check_text("reason", reason, MAX_TEXT_BYTES, required=True)
        cause = cause or root_cause(reason, self.now())
        if cause not in FAILURE_TYPES:
            raise InputError(f"bad failure cause {cause!r}: one of {', '.join(sorted(FAILURE_TYPES))}")
        fault = int(counts_for_breaker(cause))
        reply = self._run_call("fail_run", task_id, run_id, [cause, reason, int(retry), fault])
        return TaskStatus(reply[1]), int(reply[2])

    def rate_limited(
        self,
        task_id: int,
        run_id: str,
        *,
        retry_after: float | None = None,
        message: str = "",
        reset_at: float | None = None,
        quota: bool | None = None,
        cause: str | None = None,
    ) -> tuple[str, float]:
        """The run hit a rate/usage limit: cool its model, return the task to its head.

        The cooldown ends after ``retry_after`` seconds, else at ``reset_at``, else at the reset parsed
        from ``message``, else after the config's rate_limit_cooldown_minutes (read by the script, so it is
        the current config's). Returns the model and the cooldown end.

        ``quota`` None: ``message`` is an unclassified text, parsed here for its class and reset. A caller that
        parsed it already (the agent protocol) gives ``quota`` and ``reset_at``: the text is not parsed twice.
        ``cause`` names another reason to cool the model the same way (``auth``, ``agent_config``: the model's
        agent cannot run at all; no attempt is used).
        """
        now = self.now()
        check_text("message", message, MAX_TEXT_BYTES)
        if retry_after is not None and (
                not math.isfinite(retry_after) or retry_after <= 0 or retry_after > MAX_RESET_SECONDS):
            raise InputError(f"bad retry-after {retry_after}: seconds in (0, {MAX_RESET_SECONDS}]")
        if quota is None:
            signal = parse_signal(message, now) if message else None
            quota = signal is not None and signal.klass is SignalClass.QUOTA_REACHED
            if reset_at is None and signal is not None:
                reset_at = signal.reset_at
        until: float | None = None
        if retry_after is not None:
            until = now + retry_after
        elif reset_at is not None and now < reset_at <= now + MAX_RESET_SECONDS:
            until = reset_at
        klass = cause or ("quota_reached" if quota else "rate_limit")
        if klass not in COOLING_TYPES:
            raise InputError(f"bad cooling cause {klass!r}: one of {', '.join(sorted(COOLING_TYPES))}")
        text = message or (f"rate limited for {until - now:.0f}s" if until is not None else "rate limited")
        fault = int(counts_for_breaker(klass, reset_known=until is not None))
        reply = self._run_call("rate_limited_run", task_id, run_id,
                               ["" if until is None else _ms(until), klass, text, fault])
        return str(reply[1]), int(reply[2]) / 1000

    def workdir_missing(self, task_id: int, run_id: str, board: str, path: str) -> None:
        """The board's workdir is gone: pause the board, then give the run back without using an attempt (the
        event names the board and the path; the dispatcher alerts once)."""
        self.pause(board)
        self.release(task_id, run_id, "workdir_missing", f"workdir of board {board} does not exist: {path}")

    def record_usage(self, task_id: int, run_id: str, model: str, board: str, session_id: str | None,
                     usage: dict[str, Any]) -> None:
        """Keep what a run's agent CLI said about itself (session id, tokens, cost) beside its history, and
        add it to the per-model and per-board counters."""
        doc = usage_doc(usage)
        with redis_errors(self._where):
            pipe = self.client.pipeline(transaction=True)
            queue_usage(pipe, self.keys, task_id, run_id, (model, board), session_id, doc, self.now())
            pipe.execute()

    def usage_stats(self) -> tuple[dict[tuple[str, str, str], int], dict[tuple[str, str], float]]:
        """What the agent CLIs reported, in one transaction: tokens by (model, board, kind) and dollars by
        (model, board)."""
        with redis_errors(self._where):
            return read_usage_stats(self.client, self.keys)

    def cost_since(self, since: float) -> dict[str, float]:
        """Dollars per model reported by runs since ``since`` (hour resolution); drops hours older than two days."""
        with redis_errors(self._where):
            hourly = texts(self.client.hgetall(self.keys.stats_agent_cost_hourly))
            stale = stale_hours(list(hourly), self.now())
            if stale:
                self.client.hdel(self.keys.stats_agent_cost_hourly, *stale)
        return cost_since(hourly, since)

    def release(
        self, task_id: int, run_id: str, reason: str = "released", message: str = "", *, hold_s: float = 0.0
    ) -> None:
        """Give a claimed run back without using an attempt: the task is the board head again at once.

        ``hold_s`` > 0: the agent runtime failed, not the task; claims are held that long (:meth:`agent_gate`
        says why: ``"<reason>: <message>"``), in the same atomic call.
        """
        check_text("message", message, MAX_TEXT_BYTES)
        if not math.isfinite(hold_s) or not 0 <= hold_s <= MAX_RESET_SECONDS:
            raise InputError(f"bad hold {hold_s}: seconds in [0, {MAX_RESET_SECONDS}]")
        self._run_call("release_run", task_id, run_id, [reason, message, _ms(hold_s)])

    def reap(self) -> list[int]:
        """Requeue every task whose lease deadline passed; returns their ids."""
        requeued: list[int] = []
        while True:
            reply = self._call("reap_leases", [self._now_arg(), REAP_BATCH])
            requeued.extend(int(reply[i]) for i in range(2, len(reply), 2))
            if int(reply[1]) < REAP_BATCH:
                return requeued

    def cancel(self, task_id: int) -> TaskStatus:
        """Cancel a task wherever it is; returns the status it had."""
        check_task_id(task_id)
        reply = self._call("cancel_task", [self._now_arg(), task_id], task_id=task_id)
        status = Status(reply[0])
        if status is not Status.OK:
            raise error_for(status, task_id, "", str(reply[1]))
        return TaskStatus(reply[1])

    # -- boards and models -----------------------------------------------------------------------
    def pause(self, board: str) -> str:
        return self._set_paused(board, True)

    def resume(self, board: str) -> str:
        return self._set_paused(board, False)

    def _set_paused(self, board: str, paused: bool) -> str:
        check_board(board)
        reply = self._call("set_board_paused", [self._now_arg(), board, int(paused)])
        return str(reply[1])

    def set_cooldown(self, model: str, seconds: float) -> float:
        """Cool ``model`` for exactly ``seconds`` from now (0 clears); returns the end (epoch s)."""
        if not math.isfinite(seconds) or seconds < 0 or seconds > MAX_RESET_SECONDS:
            raise InputError(f"bad cooldown {seconds}: seconds in [0, {MAX_RESET_SECONDS}]")
        self._check_known(model=model)
        now = self.now()
        reply = self._call("set_cooldown", [self._now_arg(), model, _ms(now + seconds)], model=model)
        if Status(reply[0]) is not Status.OK:
            raise UnknownChain(str(reply[1]))
        return int(reply[1]) / 1000

    def clear_cooldown(self, model: str) -> None:
        self.set_cooldown(model, 0)

    def cooldowns(self) -> dict[str, dict[str, Any]]:
        """Models cooling now: {model: {"until": epoch s, "remaining_s": s, "reason": str}}."""
        def queue(pipe: Any, cfg: Config) -> None:
            for m in sorted(cfg.models):
                pipe.get(self.keys.cooldown(m))

        cfg, values = self.read_with_config(queue)
        now = self.now()
        out: dict[str, dict[str, Any]] = {}
        for model, raw in zip(sorted(cfg.models), values, strict=True):
            if raw:
                until_ms, _, reason = to_str(raw).partition("|")
                until = int(until_ms) / 1000
                if until > now:
                    out[model] = {"until": until, "remaining_s": round(until - now, 3), "reason": reason}
        return out

    # -- provider breakers -----------------------------------------------------------------------
    def breakers(self) -> dict[str, BreakerState]:
        """Every configured provider's breaker: closed, open or half_open, with its time left."""
        def queue(pipe: Any, cfg: Config) -> None:
            for p in sorted(set(cfg.models.values())):
                pipe.hgetall(self.keys.breaker(p))
                pipe.zcard(self.keys.breaker_failures(p))

        cfg, rows = self.read_with_config(queue)
        now = self.now()
        providers = sorted(set(cfg.models.values()))
        return {p: state_from(p, texts(rows[2 * i]), int(rows[2 * i + 1]), now) for i, p in enumerate(providers)}

    def open_breaker(self, provider: str, minutes: float) -> BreakerState:
        """Open ``provider``'s breaker for exactly ``minutes`` (an opening like any other: event provider_open)."""
        return self._set_breaker(provider, _ms(check_open_minutes(minutes) * 60))

    def close_breaker(self, provider: str) -> BreakerState:
        """Close ``provider``'s breaker fully at once: its back-off and failure window reset."""
        return self._set_breaker(provider, 0)

    def _set_breaker(self, provider: str, length_ms: int) -> BreakerState:
        if provider not in set(self.config().models.values()):
            raise UnknownChain(f"unknown provider {provider!r}")
        reply = self._call("set_breaker", [self._now_arg(), provider, max(0, length_ms)], provider=provider)
        if Status(reply[0]) is not Status.OK:
            raise UnknownChain(str(reply[1]))
        return self.breakers()[provider]

    # -- reading ---------------------------------------------------------------------------------
    def get_task(self, task_id: int) -> Task:
        check_task_id(task_id)
        with redis_errors(self._where):
            pipe = self.client.pipeline(transaction=True)
            self._queue_task_reads(pipe, task_id)
            fields, context, runs, logs, meta = pipe.execute()
        return self._task_from_reads(task_id, fields, context, runs, logs, meta)

    def _queue_task_reads(self, pipe: Any, task_id: int, *, logs: bool = True) -> None:
        """Add the reads of a task to ``pipe``: its hash, context, runs, run logs (unless ``logs`` is false) and
        run meta."""
        pipe.hgetall(self.keys.task(task_id))
        pipe.lrange(self.keys.context(task_id), 0, -1)
        pipe.lrange(self.keys.runs(task_id), 0, -1)
        if logs:
            pipe.hgetall(self.keys.run_log(task_id))
        pipe.hgetall(self.keys.run_meta(task_id))

    @staticmethod
    def _task_from_reads(task_id: int, fields: Any, context: Any, runs: Any, logs: Any, meta: Any) -> Task:
        if not fields:
            raise TaskNotFound(task_id)
        f = texts(fields)
        task = task_from(task_id, f, context, runs)
        task.runs = with_open_run(f, task.runs)
        logs_t, meta_t = texts(logs or {}), texts(meta)
        for run in task.runs:
            log = logs_t.get(str(run.get("run_id")))
            if log:
                run["log"] = log
            extra = meta_t.get(str(run.get("run_id")))
            if extra:  # the session id and usage its agent CLI reported
                run.update(json.loads(extra))
        return task

    def list_tasks(self, *, board: str | None = None, status: TaskStatus | None = None) -> list[Task]:
        """Tasks in id order, optionally of one board and/or one status.

        A task is always in exactly one place (a board queue, ``running`` or a status ZSET), so the places
        of the statuses asked for list every such task; each is then read from its hash, which decides.
        """
        if board is not None:
            check_board(board)
        with redis_errors(self._where):
            ids = self._placed_ids(board, status)
            rows: list[Any] = []
            for start in range(0, len(ids), LIST_BATCH):
                pipe = self.client.pipeline(transaction=False)
                for tid in ids[start : start + LIST_BATCH]:
                    pipe.hgetall(self.keys.task(tid))
                rows += pipe.execute()
        tasks = [task_from(tid, texts(f), [], []) for tid, f in zip(ids, rows, strict=True) if f]
        return [
            t for t in tasks
            if (board is None or t.board == board) and (status is None or t.status is status)
        ]

    def _placed_ids(self, board: str | None, status: TaskStatus | None) -> list[int]:
        """The ids in the places of ``status`` (every status when None), of ``board``'s queue only when given."""
        k = self.keys
        places = {TaskStatus.SCHEDULED: k.scheduled, TaskStatus.IN_PROGRESS: k.running,
                  TaskStatus.IN_REVIEW: k.in_review, TaskStatus.FAILED: k.failed, TaskStatus.CANCELLED: k.cancelled}
        keys = [key for st, key in places.items() if status in (None, st)]
        if status in (None, TaskStatus.UP_NEXT):
            boards = [board] if board is not None else sorted(to_str(b) for b in self.client.smembers(k.boards))
            keys += [k.queue(b) for b in boards]
        pipe = self.client.pipeline(transaction=True)  # one moment: a task moving between places is seen once
        for key in keys:
            pipe.zrange(key, 0, -1)
        return sorted({int(text(x)) for members in pipe.execute() for x in members})

    def events(self, count: int = 100, after: str = "-") -> list[dict[str, Any]]:
        """Events oldest first, after stream id ``after`` (exclusive when given)."""
        start = after if after == "-" else f"({after}"
        with redis_errors(self._where):
            rows: Any = self.client.xrange(self.keys.events, min=start, max="+", count=count)
        return [event(eid, fields) for eid, fields in rows or []]

    def latest_events(self, count: int) -> list[dict[str, Any]]:
        """The ``count`` newest events, newest first."""
        with redis_errors(self._where):
            rows: Any = self.client.xrevrange(self.keys.events, count=count)
        return [event(eid, fields) for eid, fields in rows or []]

    def latest_event_id(self) -> str:
        """The stream id of the newest event ("0-0" when there is none): wait for events after it."""
        newest = self.latest_events(1)
        return str(newest[0]["id"]) if newest else "0-0"

    def last_events(self, count: int, keep: Callable[[dict[str, Any]], bool] | None = None,
                    page: int = 1000) -> list[dict[str, Any]]:
        """The last ``count`` events that ``keep`` accepts (every event when None), oldest first. Read newest
        first, a page at a time, so a match older than any number of other events is still found."""
        found: list[dict[str, Any]] = []
        end = "+"
        with redis_errors(self._where):
            while len(found) < count:
                rows: Any = self.client.xrevrange(self.keys.events, max=end, min="-", count=page)
                for eid, fields in rows or []:
                    row = event(eid, fields)
                    if keep is None or keep(row):
                        found.append(row)
                        if len(found) == count:
                            break
                if not rows or len(rows) < page:
                    break
                end = "(" + to_str(rows[-1][0])
        return found[::-1]

    def board_exists(self, board: str) -> bool:
        """Whether ``board`` is known: it had a task, or was paused or resumed on purpose."""
        check_board(board)
        with redis_errors(self._where):
            return bool(self.client.sismember(self.keys.boards, board))

    def wait_events(self, after: str, block_ms: int) -> list[dict[str, Any]]:
        """Block up to ``block_ms`` for events after stream id ``after`` ("$" = only new ones)."""
        with redis_errors(self._where):
            reply = self.client.xread({self.keys.events: after}, block=block_ms, count=100)
        rows = xread_rows(reply)
        return [event(eid, fields) for eid, fields in rows]

    def save_run_log(self, task_id: int, run_id: str, lines: list[str], limit_bytes: int) -> None:
        """Keep the tail of a run's agent log beside its history (``show`` merges it in)."""
        text = "\n".join(lines)
        encoded = text.encode("utf-8")
        if len(encoded) > limit_bytes:
            text = "…" + encoded[-limit_bytes:].decode("utf-8", "ignore")
        if text:
            with redis_errors(self._where):
                self.client.hset(self.keys.run_log(task_id), run_id, text)

    # -- bookkeeping of the dispatchers: who alerts, and the counters -------------------------------
    def count_skip(self, reason: str, n: int = 1) -> None:
        """Count ``n`` boards refused for ``reason`` outside a claim (e.g. agent_not_ready: no claim was tried)."""
        with redis_errors(self._where):
            self.client.hincrby(self.keys.stats_skips, reason, n)

    def counters(self) -> Counters:
        """Every ``stats:*`` counter of the namespace, and each board's outcomes (``board:<b>`` ``completed``, plus
        what ``stats:completed`` counted before), in one transaction (the boards' names read just before it)."""
        k = self.keys
        with redis_errors(self._where):
            boards = sorted(to_str(b) for b in self.client.smembers(k.boards))
            pipe = self.client.pipeline(transaction=True)
            pipe.hgetall(k.stats_completed)
            pipe.hgetall(k.stats_failures)
            pipe.hgetall(k.stats_skips)
            pipe.get(k.stats_claims)
            pipe.hgetall(k.stats_claim_to_start)
            for b in boards:
                pipe.hget(k.board(b), "completed")
            replies = pipe.execute()
        completed, failures, skips_, claims, histogram = replies[:5]
        return counters_from(completed, failures, skips_, claims, histogram,
                             dict(zip(boards, replies[5:], strict=True)))

    def last_task_id(self) -> int:
        """The highest task id handed out or given so far (0 before the first task)."""
        with redis_errors(self._where):
            return int(to_str(self.client.get(self.keys.task_seq) or 0))

    def take_summary_turn(self, interval_s: float) -> bool:
        """Whether this caller sends this interval's summary: True for exactly one caller per ``interval_s``."""
        with redis_errors(self._where):
            return bool(self.client.set(self.keys.summary_lock, "1", nx=True, px=max(1, _ms(interval_s))))

    def first_to_alert(self, event_id: str, ttl_s: float) -> bool:
        """Whether this caller sends the alert of event ``event_id``: True once per event across dispatchers."""
        with redis_errors(self._where):
            return bool(self.client.set(self.keys.notified(event_id), "1", nx=True, px=max(1, _ms(ttl_s))))

    def first_to_alert_model(self, kind: str, model: str, ttl_s: float) -> bool:
        """Whether this caller sends the ``kind`` alert of ``model`` (auth): True once per ``ttl_s`` (its cooldown)."""
        with redis_errors(self._where):
            return bool(self.client.set(self.keys.notified_model(kind, model), "1", nx=True,
                                        px=max(1000, _ms(ttl_s))))

    def first_to_alert_wipe(self, previous: str, ttl_s: float) -> bool:
        """Whether this caller sends the alert that the namespace (once ``previous``) was wiped and re-created as
        its current identity: True for one caller across dispatchers."""
        with redis_errors(self._where):
            return bool(self.client.set(self.keys.wiped_lock(str(self.identity)), previous, nx=True,
                                        px=max(1, _ms(ttl_s))))

    def outage_begins(self, why: str, ttl_s: float) -> bool:
        """Record that the agent runtime is not ready; True for the one caller that should alert (the first)."""
        with redis_errors(self._where):
            return bool(self.client.set(self.keys.outage_lock, why[:500], nx=True, px=max(1, _ms(ttl_s))))

    def outage_ends(self) -> bool:
        """Record that the agent runtime is ready; True for the one caller that should say so (an outage was on)."""
        with redis_errors(self._where):
            return bool(self.client.delete(self.keys.outage_lock))

    def trip_agent_gate(self, seconds: float, reason: str) -> None:
        """Hold claims for ``seconds``: the agent runtime is down or refuses this client."""
        with redis_errors(self._where):
            self.client.set(self.keys.agent_gate, reason[:500], px=max(1, _ms(seconds)))

    def agent_gate(self) -> str | None:
        """Why claims are held (the agent runtime is down), or None."""
        with redis_errors(self._where):
            value = self.client.get(self.keys.agent_gate)
        return None if value is None else to_str(value)

    def explain_boards(self, boards: list[str], global_cap: int | None = None) -> list[str]:
        """Why each board's head is not running now (the claim's own rules, read-only), judged under the config
        in Redis now: the script refuses a global cap computed from an older config, and it is computed again.
        ``global_cap``: judge under this cap instead of the config's."""
        if not boards:
            return []
        for _ in range(3):
            cap = self.config().global_cap_at(self.now())[0] if global_cap is None else global_cap
            args = [self.keys.prefix, self._now_arg(), cap, self._config_version, *boards]
            with redis_errors(self._where):
                reply = self._scripts.call("explain_boards", args)
            if Status(reply[0]) is not Status.CONFIG_STALE:
                return [str(x) for x in reply[1:]]
            self._config = None
        raise ScriptError("the config kept changing while explaining the boards; try again")

    def read_with_config(self, queue: Callable[[Any, Config], None]) -> tuple[Config, list[Any]]:
        """Reads that depend on the config, in one MULTI with the config version: ``queue(pipe, config)`` adds
        them for the cached config; when the version read is not that config's, the config is reloaded and the
        reads are made again. Returns the config they were made for and their replies."""
        for _ in range(3):
            cfg = self.config()
            with redis_errors(self._where):
                pipe = self.client.pipeline(transaction=True)
                pipe.hget(self.keys.cfg_settings, "version")
                queue(pipe, cfg)
                version, *replies = pipe.execute()
            if ("" if version is None else to_str(version)) == self._config_version:
                return cfg, replies
            self._config = None
        raise ScriptError("the config kept changing during the read; try again")

    def observe_claim_to_start(self, seconds: float) -> None:
        """Record how long a claimed run waited for its worker (the claim-to-start histogram)."""
        with redis_errors(self._where):
            observe_claim_to_start(cast(redis.Redis, self.client), self.keys, seconds)

    def next_deadline(self) -> float | None:
        """The nearest time something becomes due: a lease deadline, a backoff end or a cooldown end."""
        return self.deadlines().next

    def deadlines(self) -> Deadlines:
        """Lease, backoff and cooldown ends and the summary lock's time left, in one round trip (the dispatcher's
        read per wake). It also checks the namespace id: raises NamespaceWiped when it changed."""
        with redis_errors(self._where):
            pipe = self.client.pipeline(transaction=False)
            pipe.zrange(self.keys.running, 0, 0, withscores=True)
            pipe.zrange(self.keys.idx_backoff, 0, 0, withscores=True)
            pipe.hgetall(self.keys.blocked)
            pipe.pttl(self.keys.summary_lock)
            pipe.zrange(self.keys.scheduled, 0, 0, withscores=True)
            pipe.zrange(self.keys.schedules, 0, 0, withscores=True)
            pipe.hget(self.keys.meta, MetaFields.ID)
            lease, backoff, blocked, pttl, scheduled, schedules, ident = pipe.execute()
        self._observe_identity(ident, strict=True)
        now_ms = self.now() * 1000
        cooling = [int(str(text(v)).partition("|")[0]) for f, v in blocked.items()
                   if to_str(f)[:2] in ("c:", "o:")]
        ends = [ms for ms in cooling if ms > now_ms]
        return Deadlines(
            lease=float(lease[0][1]) / 1000 if lease else None,
            backoff=float(backoff[0][1]) / 1000 if backoff else None,
            cooldown=min(ends) / 1000 if ends else None,
            summary_lock_s=int(pttl) / 1000 if int(pttl) > 0 else None,
            scheduled=float(scheduled[0][1]) / 1000 if scheduled else None,
            schedule=float(schedules[0][1]) / 1000 if schedules else None,
        )

    def health(self) -> dict[str, Any]:
        """The health document as JSON-ready data (the dump of :meth:`health_report`)."""
        return self.health_report().doc()

    def health_report(self) -> Health:
        """Queue depth, in progress, throughput and why_waiting per board; inflight, cap, cooldown per model;
        providers and their breakers; recent errors (:class:`~clawq.broker.health.Health`)."""
        with redis_errors(self._where):
            report = collect_health(self)
        namespace = {"name": self.namespace, **self.namespace_info().doc()}
        return report.model_copy(update={"namespace": namespace, "redis": self.memory().doc()})

    def memory(self) -> MemoryState:
        """Redis's eviction policy, memory limit and use (:mod:`broker.memory`); ``warning()`` says whether
        Redis may delete clawq's keys by itself."""
        with redis_errors(self._where):
            return read_memory(self.client)

    def doctor(self, repair: bool = False) -> dict[str, Any]:
        """Check every invariant (one atomic script); with ``repair`` rebuild the derived state.

        Returns ``{"ok", "problems", "repaired", "remaining"}``: the problems found, what the repair
        changed, and what a check after the repair still finds (``ok`` when that is empty).
        """
        def run(fix: bool) -> Any:
            with redis_errors(self._where):
                ids = self._task_hash_ids()
                reply = self._scripts.call("doctor", [self.keys.prefix, self._now_arg(), int(fix), *ids])
            return parse_reply(reply)

        found = run(repair)
        remaining = found.problems
        if repair and found.problems:
            remaining = run(False).problems
        report = doctor_report(found, remaining)
        for problem in filter(None, [self.memory().warning(), self._config_damage()]):
            report["problems"].append(problem)  # nothing the repair can change
            report["remaining"].append(problem)
            report["ok"] = False
        info = self.namespace_info()  # not a problem to repair, but what happened: a wipe, and when
        line = info.recreated_line(_iso(info.recreated_at)) if info.recreated_at is not None else None
        report["notes"] = [line] if line else []
        return report

    def _config_damage(self) -> str | None:
        """A config JSON and its settings hash go together (load_config writes both): one without the other
        means a key was evicted or deleted."""
        with redis_errors(self._where):
            has_json, has_settings = self.client.exists(self.keys.config), self.client.exists(self.keys.cfg_settings)
        if bool(has_json) == bool(has_settings):
            return None
        gone = "the config" if not has_json else "the config's settings (cfg:settings)"
        return f"{gone} is missing from Redis (evicted or deleted): load the config again with `clawq config load`"

    def _task_hash_ids(self) -> list[int]:
        """The id of every task hash, found with SCAN (no index lists every task; SCAN never blocks Redis)."""
        head = self.keys.task(0)[:-1]  # "<prefix>task:"
        ids = set()
        for key in self.client.scan_iter(match=_glob_escape(head) + "*", count=1000):
            rest = to_str(key)[len(head):]
            if rest.isdigit():
                ids.add(int(rest))
        return sorted(ids)


def _item_replies(reply: list[Any]) -> list[list[Any] | ClawqError]:
    """A batch script's reply: one reply per item, each as text."""
    return [[text(x) for x in item] for item in reply]


def _complete_args(outcome: Outcome) -> list[str | int | float]:
    """complete_run's ARGV after the run id."""
    extras = outcome.extras()
    return [int(outcome.needs_follow_up), outcome.next_prompt or "", outcome.summary,
            json.dumps(extras) if extras else "{}", outcome.digest()]


def _translated(err: Exception, where: str) -> ClawqError:
    """The ClawqError redis-py's ``err`` becomes at the boundary (RedisUnavailable raises)."""
    try:
        with redis_errors(where):
            raise err
    except RedisUnavailable:
        raise
    except ClawqError as translated:
        return translated
    raise AssertionError("unreachable")  # pragma: no cover


def _iso(ts: float) -> str:
    """Epoch seconds as an ISO 8601 UTC time (for reports)."""
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="seconds")


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a SCAN MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
