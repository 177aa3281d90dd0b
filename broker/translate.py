"""The Redis boundary: redis-py's errors become clawq's, one line each, with no traceback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis
from redis.exceptions import RedisClusterException
from redis.sentinel import MasterNotFoundError

from .errors import ConfigMissing, RedisOutOfMemory, RedisUnavailable, ScriptError

__all__ = ["redis_errors"]

#: What lib/core.lua's setting() and read_claim_config() raise when the config a script needs is gone.
_CONFIG_MISSING = "clawq: config "


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _out_of_memory(err: redis.ResponseError) -> bool:
    """An OOM refusal: redis-py's own class, or (a script's error on Redis 6.2) the server's OOM text."""
    return isinstance(err, redis.exceptions.OutOfMemoryError) or "OOM command not allowed" in str(err)


@contextmanager
def redis_errors(where: str) -> Iterator[None]:
    """Translate redis-py's connection and response errors met inside the block into clawq's.

    ``where`` is the redacted address of the server, for the message.
    """
    try:
        yield
    except MasterNotFoundError:
        raise RedisUnavailable(f"cannot reach Redis at {where}: no primary for this service (Sentinel)") from None
    except (redis.ConnectionError, redis.TimeoutError, RedisClusterException) as err:
        raise RedisUnavailable(f"cannot reach Redis at {where}: {_one_line(err)}") from None
    except redis.ResponseError as err:
        if _out_of_memory(err):
            raise RedisOutOfMemory(
                f"Redis is out of memory at {where}: it refused a write (maxmemory reached, policy noeviction) and "
                "nothing was written; free memory or raise maxmemory, then try again") from None
        if _CONFIG_MISSING in str(err):
            raise ConfigMissing(f"the namespace has no config: {_one_line(err)}") from None
        raise ScriptError(f"Redis refused a clawq command: {_one_line(err)}") from None
    except redis.RedisError as err:  # anything else redis-py says (e.g. a setting it cannot use)
        raise RedisUnavailable(f"Redis at {where}: {_one_line(err)}") from None
