"""Connecting a long-running process (dispatcher, worker, server) to a Redis that may not be up yet.

A daemon started before Redis (a machine booting, a restart of both) should not die: it says once that it
waits, tries again every :data:`RETRY_S`, and goes on the moment Redis answers. A bad URL or a namespace of
another schema is not worth waiting for: those raise at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from .broker import Broker
from .errors import RedisUnavailable

__all__ = ["RETRY_S", "connect_when_ready"]

#: How often a waiting process tries Redis again (redis-py's own retries come on top, each under a second).
RETRY_S = 0.5


def connect_when_ready(
    url: str,
    namespace: str,
    *,
    on_wait: Callable[[RedisUnavailable], None],
    stop: threading.Event | None = None,
    retry_s: float = RETRY_S,
    **kwargs: Any,
) -> Broker | None:
    """A connected :class:`Broker` for ``url``, waiting for Redis as long as it takes.

    ``on_wait`` is called once, with the first error, when Redis does not answer. Returns None if ``stop``
    is set while waiting. ``kwargs`` go to :meth:`Broker.from_url`.
    """
    told = False
    while True:
        try:
            return Broker.from_url(url, namespace, **kwargs)
        except RedisUnavailable as err:
            if not told:
                on_wait(err)
                told = True
        if stop is not None:
            if stop.wait(retry_s):
                return None
        else:
            threading.Event().wait(retry_s)
