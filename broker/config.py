"""The clawq configuration: one pydantic model, YAML in, JSON and script settings out.

A field missing from a file keeps its default, also inside a section that is given; a map given in the file
(caps, models, chains) replaces the default map whole.
"""

from __future__ import annotations

import json
import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .keys import BOARD_RE

__all__ = ["DEFAULT_CONFIG", "PRESETS", "AgentEntry", "BoardConfig", "Config", "load_config_file", "parse_config"]

_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")
_MS_PER_MINUTE = 60_000


#: Upper bounds: a cap above this or a duration above 30 days is a typo, not a setting.
MAX_CAP = 100_000
MAX_MINUTES = 30 * 24 * 60


class _Section(BaseModel):
    # strict: `true` is not a cap and "6" is not a number; no NaN or infinity anywhere.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class QueueConfig(_Section):
    global_max_concurrent: int = Field(6, ge=0, le=MAX_CAP)  #: day cap on tasks in progress at once
    one_in_progress_per_board: Literal[True] = True  #: the only mode clawq has
    pick_order: Literal["task_id_asc"] = "task_id_asc"  #: the only order clawq has


def _default_model_caps() -> dict[str, int]:
    return {"opus": 2, "codex": 2, "sonnet": 2, "gemini3": 3, "gemini3_flash": 4, "glm": 4}


def _default_provider_caps() -> dict[str, int]:
    return {"anthropic": 3, "openai": 3, "google": 4, "zai": 4}


class LimitsConfig(_Section):
    model_max_inflight: dict[str, int] = Field(default_factory=_default_model_caps)
    provider_max_inflight: dict[str, int] = Field(default_factory=_default_provider_caps)

    @field_validator("model_max_inflight", "provider_max_inflight")
    @classmethod
    def _non_negative(cls, caps: dict[str, int]) -> dict[str, int]:
        for name, cap in caps.items():
            if not 0 <= cap <= MAX_CAP:
                raise ValueError(f"cap of {name!r} must be between 0 and {MAX_CAP}, got {cap}")
        return caps


class WatchdogConfig(_Section):
    stale_in_progress_minutes: float = Field(20.0, gt=0, le=MAX_MINUTES)  #: a heartbeat extends the lease by this much
    heartbeat_grace_minutes: float = Field(3.0, ge=0, le=MAX_MINUTES)  #: extra slack on the first lease
    rate_limit_cooldown_minutes: float = Field(10.0, gt=0, le=MAX_MINUTES)  #: cooldown when a rate limit names no reset
    failure_cooldown_minutes: float = Field(5.0, ge=0, le=MAX_MINUTES)  #: backoff before a failed task may run again
    max_attempts: int = Field(3, ge=1, le=1000)  #: failures/timeouts since the last outcome before `failed`
    #: an agent that is not logged in (or whose key is refused) cools its model this long; no attempt is used
    auth_cooldown_minutes: float = Field(30.0, gt=0, le=MAX_MINUTES)


class NightModeConfig(_Section):
    timezone: str = "America/Argentina/Buenos_Aires"
    start: str = "23:00"
    end: str = "08:00"
    global_max_concurrent: int = Field(8, ge=0, le=MAX_CAP)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, name: str) -> str:
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone {name!r}") from None
        return name

    @field_validator("start", "end")
    @classmethod
    def _hhmm(cls, value: str) -> str:
        if not _HHMM.match(value):
            raise ValueError(f"time must be HH:MM, got {value!r}")
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> NightModeConfig:
        if self.start == self.end:
            raise ValueError(f"start and end are both {self.start!r}: the window would be empty")
        return self

    def contains(self, ts: float) -> bool:
        """True when epoch second ``ts`` falls in the window (which may wrap midnight)."""
        local = datetime.fromtimestamp(ts, tz=UTC).astimezone(ZoneInfo(self.timezone))
        minute = local.hour * 60 + local.minute
        start, end = _minutes(self.start), _minutes(self.end)
        if start < end:
            return start <= minute < end
        return minute >= start or minute < end

    def next_open(self, ts: float) -> float:
        """The first epoch second at or after ``ts`` inside the window: ``ts`` itself while the window is open,
        else the window's next start (in the window's zone, across DST changes)."""
        if self.contains(ts):
            return ts
        return next_local_time(self.start, ts, self.timezone)


def next_local_time(hhmm: str, ts: float, zone: str) -> float:
    """The first epoch second after ``ts`` whose local time in ``zone`` is ``hhmm`` (a time skipped by a DST
    change counts as the instant it maps to)."""
    tz = ZoneInfo(zone)
    local = datetime.fromtimestamp(ts, tz=UTC).astimezone(tz)
    hours, minutes = (int(x) for x in hhmm.split(":"))
    for days in range(3):
        day = local.date() + timedelta(days=days)
        at = datetime(day.year, day.month, day.day, hours, minutes, tzinfo=tz).timestamp()
        if at > ts:
            return at
    raise AssertionError("unreachable: a local time recurs within two days")


def _minutes(hhmm: str) -> int:
    hours, minutes = hhmm.split(":")
    return int(hours) * 60 + int(minutes)


class BreakerConfig(_Section):
    """The provider-wide circuit breaker: ``failures`` qualifying failures of one provider's models within
    ``window_minutes`` open it for ``cooldown_minutes``; then one probe run may go (half-open). A probe that
    fails re-opens it for twice as long, up to ``max_cooldown_minutes``; one that succeeds closes it."""

    enabled: bool = True  #: false: failures never open a breaker (an operator still can)
    failures: int = Field(3, ge=1, le=1000)  #: qualifying failures within the window that open it
    window_minutes: float = Field(5.0, gt=0, le=MAX_MINUTES)  #: the sliding window they are counted in
    cooldown_minutes: float = Field(10.0, gt=0, le=MAX_MINUTES)  #: the first opening's length
    max_cooldown_minutes: float = Field(60.0, gt=0, le=MAX_MINUTES)  #: each re-open doubles it, up to this

    @model_validator(mode="after")
    def _max_not_below(self) -> BreakerConfig:
        if self.max_cooldown_minutes < self.cooldown_minutes:
            raise ValueError(f"max_cooldown_minutes {self.max_cooldown_minutes} is below cooldown_minutes "
                             f"{self.cooldown_minutes}")
        return self


class FollowupConfig(_Section):
    max_runs: int = Field(5, ge=1, le=1000)  #: a follow-up asked after this many runs goes to in_review instead


class SimulatedOutage(_Section):
    """A provider that is down for a while: the simulated agent answers its runs with a 529 overload."""

    provider: str
    start: float = Field(ge=0)  #: epoch seconds
    end: float = Field(ge=0)


class SimulatedAgentConfig(_Section):
    """The deterministic fake agent (``agent.runner: simulated``): seeded durations and faults."""

    seed: int = 42
    speed: float = Field(60.0, gt=0, le=MAX_MINUTES)  #: simulated minutes per real second
    min_minutes: float = Field(2.0, ge=0, le=MAX_MINUTES)
    max_minutes: float = Field(20.0, ge=0, le=MAX_MINUTES)
    follow_up_rate: float = Field(0.25, ge=0, le=1)  #: share of first runs that ask for a follow-up
    fail_rate: float = Field(0.05, ge=0, le=1)
    rate_limit_rate: float = Field(0.08, ge=0, le=1)
    stall_rate: float = Field(0.0, ge=0, le=1)  #: runs whose heartbeats stop (the agent hangs)
    #: fates decided in advance, "<task_id>:<claim index>" -> fate; they override the rates
    plan: dict[str, Literal["done", "follow_up", "rate_limit", "quota", "fail", "stall"]] = Field(
        default_factory=dict
    )
    outage: SimulatedOutage | None = None  #: a provider outage: its runs that end inside it fail as overloaded


class AgentConfig(_Section):
    """How workers run an agent for a claimed task."""

    runner: Literal["command", "python", "simulated"] = "command"
    command: list[str] = Field(default_factory=list)  #: argv, run without a shell
    callable: str | None = None  #: "module:function" for runner python
    timeout_minutes: float = Field(60.0, gt=0, le=MAX_MINUTES)  #: a run is killed and fails with root cause timeout
    health_url: str | None = None  #: GET it (2xx within 3 s) before claiming
    queue: str = "clawq-agents"  #: the RQ queue agent jobs go to
    log_tail_bytes: int = Field(4096, ge=0)  #: agent output kept in the run history
    simulated: SimulatedAgentConfig = SimulatedAgentConfig()

    @model_validator(mode="after")
    def _runner_needs(self) -> AgentConfig:
        if self.runner == "python" and (not self.callable or ":" not in self.callable):
            raise ValueError(f"agent.callable must be 'module:function' for runner python, got {self.callable!r}")
        if not BOARD_RE.match(self.queue):
            raise ValueError(f"agent.queue {self.queue!r} is not a valid name")
        return self


#: The agent CLIs clawq knows how to run (``agents.<model>.preset``); see workers/agents/.
PRESETS = ("claude-code", "codex", "gemini-cli", "openclaw", "opencode", "aider")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def expand_path(value: str, field: str) -> str:
    """``~`` and ``$VARS`` expanded; the result must be absolute (a relative path would depend on where the
    worker happens to start)."""
    path = os.path.expandvars(os.path.expanduser(value))
    if "$" in path:
        raise ValueError(f"{field} {value!r}: an environment variable in it is not set")
    if not os.path.isabs(path):
        raise ValueError(f"{field} {value!r} must be an absolute path (or start with ~ or $VAR)")
    return os.path.normpath(path)


def _check_env(env: dict[str, str], field: str) -> dict[str, str]:
    for name, value in env.items():
        if not _ENV_NAME.match(name):
            raise ValueError(f"{field}: bad environment variable name {name!r}")
        if "\x00" in value:
            raise ValueError(f"{field}.{name}: the value contains a NUL character")
    return env


class AgentEntry(_Section):
    """How to run one model: a CLI preset, the model name it is given, and its environment."""

    preset: Literal["claude-code", "codex", "gemini-cli", "openclaw", "opencode", "aider"]
    model: str | None = None  #: the name passed to the CLI (default: the clawq model name)
    bin: str | None = None  #: the executable (default: the preset's: claude, codex, gemini, …)
    args: list[str] = Field(default_factory=list)  #: extra argv
    env: dict[str, str] = Field(default_factory=dict)  #: set in the agent's environment (not secret: shown)
    #: agent variable -> worker variable it is copied from at run time (for secrets: never stored or shown)
    env_from: dict[str, str] = Field(default_factory=dict)
    timeout_minutes: float | None = Field(None, gt=0, le=MAX_MINUTES)  #: default agent.timeout_minutes
    prompt_template: str | None = None  #: a file replacing the prompt template (see workers/agents/prompt.py)

    @field_validator("env")
    @classmethod
    def _env(cls, env: dict[str, str]) -> dict[str, str]:
        return _check_env(env, "env")

    @field_validator("env_from")
    @classmethod
    def _env_from(cls, env: dict[str, str]) -> dict[str, str]:
        _check_env(env, "env_from")
        for name, source in env.items():
            if not _ENV_NAME.match(source):
                raise ValueError(f"env_from.{name}: bad environment variable name {source!r}")
        return env

    @field_validator("prompt_template")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        return None if value is None else expand_path(value, "prompt_template")

    @field_validator("model", "bin")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or "\x00" in value):
            raise ValueError("must not be empty")
        return value


class BoardConfig(_Section):
    """Per-board options (``boards: {<board>: {...}}``): where its agents run (``workdir``, the cwd of every
    runner), extra environment for them, and whether its tasks may only start at night."""

    workdir: str | None = None  #: ~ and $VARS expanded; must be absolute
    env: dict[str, str] = Field(default_factory=dict)
    night_only: bool = False  #: every task added to the board may only start inside the night window

    @field_validator("workdir")
    @classmethod
    def _workdir(cls, value: str | None) -> str | None:
        return None if value is None else expand_path(value, "workdir")

    @field_validator("env")
    @classmethod
    def _env(cls, env: dict[str, str]) -> dict[str, str]:
        return _check_env(env, "env")


class TelegramConfig(_Section):
    """Telegram Bot API notifier; the token is read from the environment, never stored."""

    chat_id: str | None = None  #: or env CLAWQ_TELEGRAM_CHAT_ID
    token_env: str = "CLAWQ_TELEGRAM_BOT_TOKEN"  #: name of the env var holding the bot token
    api_base: str = "https://api.telegram.org"


class WebhookConfig(_Section):
    url: str  #: POSTed a JSON document per notification


class NotifyConfig(_Section):
    summary_interval_minutes: float = Field(10.0, gt=0, le=MAX_MINUTES)
    log: bool = True  #: write notifications to the dispatcher's log
    telegram: TelegramConfig | None = None
    webhook: WebhookConfig | None = None


def _default_models() -> dict[str, str]:
    return {
        "opus": "anthropic",
        "sonnet": "anthropic",
        "codex": "openai",
        "gemini3": "google",
        "gemini3_flash": "google",
        "glm": "zai",
    }


def _default_chains() -> dict[str, list[str]]:
    return {
        "planning": ["opus", "codex", "gemini3"],
        "coding": ["codex", "sonnet", "gemini3"],
        "bulk": ["gemini3_flash", "glm"],
    }


class Config(_Section):
    """The effective configuration; ``Config()`` is the seed default."""

    queue: QueueConfig = QueueConfig()
    limits: LimitsConfig = LimitsConfig()
    watchdog: WatchdogConfig = WatchdogConfig()
    night_mode: NightModeConfig | None = NightModeConfig()
    followup: FollowupConfig = FollowupConfig()
    breaker: BreakerConfig = BreakerConfig()
    agent: AgentConfig = AgentConfig()
    notify: NotifyConfig = NotifyConfig()
    #: model -> how to run it; a model without an entry uses agent.runner / agent.command
    agents: dict[str, AgentEntry] = Field(default_factory=dict)
    models: dict[str, str] = Field(default_factory=_default_models)
    chains: dict[str, list[str]] = Field(default_factory=_default_chains)
    boards: dict[str, BoardConfig] = Field(default_factory=dict)  #: board -> workdir, env, night_only

    @field_validator("models", "chains", "boards")
    @classmethod
    def _names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if not BOARD_RE.match(name):
                raise ValueError(f"name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        for model, provider in self.models.items():
            if not BOARD_RE.match(provider):
                raise ValueError(f"models.{model}: provider {provider!r} is not a valid name")
        for model in self.limits.model_max_inflight:
            if model not in self.models:
                raise ValueError(
                    f"limits.model_max_inflight.{model}: model {model!r} has no provider in models"
                )
        for chain, members in self.chains.items():
            _check_chain(chain, members, self.models)
        for board, options in self.boards.items():
            if options.night_only and self.night_mode is None:
                raise ValueError(f"boards.{board}.night_only needs night_mode (there is no night window)")
        for model in self.agents:
            if model not in self.models:
                raise ValueError(f"agents.{model}: {model!r} is not a model (add it to models)")
        return self

    def board_night_only(self, board: str) -> bool:
        """Whether every task of ``board`` is night-only (its ``boards:`` option)."""
        options = self.boards.get(board)
        return options is not None and options.night_only

    def night_next(self, ts: float) -> float | None:
        """None while night-only tasks may start at epoch second ``ts`` (the window is open, or night mode is
        off), else when the window next opens."""
        if self.night_mode is None or self.night_mode.contains(ts):
            return None
        return self.night_mode.next_open(ts)

    # -- derived values ------------------------------------------------------------------------------
    def global_cap_at(self, ts: float) -> tuple[int, bool]:
        """The global cap in force at epoch second ``ts`` and whether the night window is on."""
        if self.night_mode is not None and self.night_mode.contains(ts):
            return self.night_mode.global_max_concurrent, True
        return self.queue.global_max_concurrent, False

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=False)

    def script_settings(self) -> dict[str, int]:
        """The scalar settings the Lua scripts read, in whole milliseconds."""
        wd = self.watchdog
        return {
            "lease_ms": round((wd.stale_in_progress_minutes + wd.heartbeat_grace_minutes) * _MS_PER_MINUTE),
            "heartbeat_ms": round(wd.stale_in_progress_minutes * _MS_PER_MINUTE),
            "backoff_ms": round(wd.failure_cooldown_minutes * _MS_PER_MINUTE),
            "cooldown_ms": round(wd.rate_limit_cooldown_minutes * _MS_PER_MINUTE),
            "max_attempts": wd.max_attempts,
            "max_runs": self.followup.max_runs,
            **self._breaker_settings(),
        }

    def _breaker_settings(self) -> dict[str, int]:
        br = self.breaker
        return {
            "breaker_failures": br.failures if br.enabled else 0,
            "breaker_window_ms": round(br.window_minutes * _MS_PER_MINUTE),
            "breaker_cooldown_ms": max(1, round(br.cooldown_minutes * _MS_PER_MINUTE)),
            "breaker_max_cooldown_ms": max(1, round(br.max_cooldown_minutes * _MS_PER_MINUTE)),
        }

    def providers(self) -> list[str]:
        return sorted(set(self.models.values()) | set(self.limits.provider_max_inflight))


def _check_chain(chain: str, members: list[str], models: dict[str, str]) -> None:
    if not members:
        raise ValueError(f"chains.{chain}: a chain needs at least one model")
    for model in members:
        if model not in models:
            raise ValueError(f"chains.{chain}: unknown model {model!r}")
    if len(set(members)) != len(members):
        raise ValueError(f"chains.{chain}: a model appears twice in {members}")


DEFAULT_CONFIG = Config()


def _format_validation(err: ValidationError) -> str:
    parts = []
    for item in err.errors():
        loc = ".".join(str(p) for p in item["loc"]) or "config"
        msg = str(item["msg"]).removeprefix("Value error, ")
        if item["type"] in ("extra_forbidden", "missing"):
            parts.append(f"{loc}: {msg}")
        else:
            parts.append(f"{loc}: {msg} (got {item.get('input')!r})"[:300])
    return "invalid config: " + "; ".join(parts)


def parse_config(data: object) -> Config:
    """Validate a parsed YAML/JSON document into a :class:`Config`; raise ConfigError naming the field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config: the top level must be a mapping, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation(err)) from None


def load_config_file(path: str | Path) -> Config:
    """Read and validate a YAML config file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config {path}: {err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"invalid YAML in {path}: {' '.join(str(err).split())}") from None
    return parse_config(data)
