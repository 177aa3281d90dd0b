"""clawq broker: a Redis-native queue for boards of AI-agent tasks.

Every queue rule lives in one atomic Lua script per operation (``lua/``); this package is the typed API
over them, shared by the CLI, the workers, the simulator and the HTTP layer.
"""

from .breaker import BreakerState, BreakerStatus
from .broker import SCHEMA_VERSION, Broker
from .config import DEFAULT_CONFIG, Config, load_config_file, parse_config
from .errors import (
    ClawqError,
    ConfigError,
    ConfigInUse,
    ConfigMissing,
    DuplicateTask,
    InputError,
    InvalidState,
    NothingToClaim,
    RedisUnavailable,
    RunFenced,
    SchemaMismatch,
    ScriptError,
    TaskNotFound,
    UnknownChain,
)
from .keys import Keys
from .models import Added, Claim, Completion, Deadlines, Outcome, Task, TaskStatus
from .redact import redact_url

__all__ = [
    "DEFAULT_CONFIG",
    "SCHEMA_VERSION",
    "Added",
    "BreakerState",
    "BreakerStatus",
    "Broker",
    "Claim",
    "ClawqError",
    "Completion",
    "Config",
    "ConfigError",
    "ConfigInUse",
    "ConfigMissing",
    "Deadlines",
    "DuplicateTask",
    "InputError",
    "InvalidState",
    "Keys",
    "NothingToClaim",
    "Outcome",
    "RedisUnavailable",
    "RunFenced",
    "SchemaMismatch",
    "ScriptError",
    "Task",
    "TaskNotFound",
    "TaskStatus",
    "UnknownChain",
    "load_config_file",
    "parse_config",
    "redact_url",
]
