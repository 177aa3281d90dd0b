"""The Redis boundary: redis-py's errors become clawq's, one line each, with no traceback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis
from redis.exceptions import RedisClusterException
from redis.sentinel import MasterNotFoundError

from .errors import RedisUnavailable, ScriptError

__all__ = ["redis_errors"]


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


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
        raise ScriptError(f"Redis refused a clawq command: {_one_line(err)}") from None
    except redis.RedisError as err:  # anything else redis-py says (e.g. a setting it cannot use)
        raise RedisUnavailable(f"Redis at {where}: {_one_line(err)}") from None
