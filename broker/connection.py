"""Redis clients from URLs: standalone, Redis Cluster and Sentinel-managed primaries.

Schemes (the password, if any, is never printed: see :func:`clawq.broker.redact.redact_url`):

* ``redis://``, ``rediss://``, ``unix://`` -- one server, as :meth:`redis.Redis.from_url` reads them.
* ``redis+cluster://[user:password@]host:port[,host:port...][/0]`` -- a Redis Cluster, reached through any of
  the listed seed nodes (``rediss+cluster://`` for TLS). A cluster has only database 0. Every key of a clawq
  namespace carries the hash tag ``{namespace}`` (:mod:`broker.keys`), so a namespace lives in one slot and
  its scripts and MULTI/EXEC pipelines run on one node.
* ``redis+sentinel://[user:password@]host:port[,host:port...]/<service_name>[/<db>]`` -- the primary that the
  listed Sentinels name for ``service_name`` (``rediss+sentinel://`` for TLS to the data nodes). The
  user/password authenticate to the data nodes; ``?sentinel_password=...`` (and ``sentinel_username``)
  to the Sentinels. After a failover the client asks the Sentinels again and reconnects to the new primary;
  redis-py's ``Script`` objects reload a script that the new primary lacks (NOSCRIPT).

Query options common to all of them: ``socket_timeout`` and ``socket_connect_timeout`` (seconds).

Every new connection costs a handshake: by redis-py's defaults HELLO 3, CLIENT MAINT_NOTIFICATIONS and two
CLIENT SETINFO (library name and version, looked up in the installed package metadata, about 1 ms, on every new
connection). Clients made here resolve that metadata once per process. ``lean=True`` clients (those of a
worker, whose every forked job opens new connections) speak RESP2 and skip SETINFO and maintenance
notifications: a new connection sends nothing before its first command (AUTH and SELECT when the URL asks).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis
import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.driver_info import DriverInfo
from redis.maint_notifications import MaintNotificationsConfig
from redis.sentinel import Sentinel, SentinelConnectionPool

from .errors import InputError
from .redact import redact_url

__all__ = ["CLUSTER_SCHEMES", "SENTINEL_SCHEMES", "Client", "client_from_url", "client_url", "pipelined",
           "rq_connection"]

#: What a Broker talks to: one server (possibly Sentinel-managed) or a cluster.
Client = redis.Redis | RedisCluster

CLUSTER_SCHEMES = frozenset({"redis+cluster", "rediss+cluster"})
SENTINEL_SCHEMES = frozenset({"redis+sentinel", "rediss+sentinel"})
_CONNECT_TIMEOUT_S = 5.0


def _scheme(url: str) -> str:
    return url.partition("://")[0].lower()


def _hosts(netloc: str, url: str) -> list[tuple[str, int]]:
    """``host:port[,host:port...]`` (the part after any ``user:password@``)."""
    hosts: list[tuple[str, int]] = []
    for item in netloc.rpartition("@")[2].split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise InputError(f"bad Redis URL {redact_url(url)}: give host:port[,host:port...], got {item!r}")
        hosts.append((host.strip("[]"), int(port)))
    return hosts


def _credentials(netloc: str) -> tuple[str | None, str | None]:
    creds, at, _ = netloc.rpartition("@")
    if not at:
        return None, None
    user, colon, password = creds.partition(":")
    if not colon:  # "password@" alone is how redis:// URLs give a password without a user
        return None, unquote(user) or None
    return unquote(user) or None, unquote(password) or None


def _options(query: str) -> dict[str, Any]:
    raw = {k: v[-1] for k, v in parse_qs(query).items()}
    out: dict[str, Any] = {"socket_connect_timeout": _CONNECT_TIMEOUT_S}
    for name in ("socket_timeout", "socket_connect_timeout"):
        if name in raw:
            out[name] = float(raw[name])
    for name in ("sentinel_password", "sentinel_username"):
        if name in raw:
            out[name] = raw[name]
    return out


@cache
def _driver_info() -> DriverInfo:
    """redis-py's CLIENT SETINFO values, resolved once per process (redis-py reads package metadata per connection)."""
    return DriverInfo()


def _handshake(lean: bool) -> dict[str, Any]:
    """Connection options: ``lean`` skips HELLO (RESP2), CLIENT SETINFO and CLIENT MAINT_NOTIFICATIONS."""
    if lean:
        quiet = MaintNotificationsConfig(enabled=False)
        return {"protocol": 2, "driver_info": None, "maint_notifications_config": quiet}
    return {"driver_info": _driver_info()}


def client_from_url(url: str, *, decode_responses: bool = True, lean: bool = False) -> Client:
    """A client for ``url`` (any scheme in the module docstring); raises InputError on a bad URL.

    A cluster client contacts a seed node here (redis-py reads the slot map on creation): an unreachable
    cluster raises :class:`redis.exceptions.RedisClusterException`. ``lean``: no handshake on a new connection
    (see the module docstring), for the connections of forked jobs; a cluster client ignores it.
    """
    scheme = _scheme(url)
    reqs = parse_qs(urlsplit(url).query).get("ssl_cert_reqs", [])
    if any(r.lower() not in ("none", "optional", "required") for r in reqs):
        raise InputError(f"bad Redis URL {redact_url(url)}: ssl_cert_reqs must be none, optional or required")
    try:
        if scheme in CLUSTER_SCHEMES:
            return _cluster_client(url, decode_responses)
        if scheme in SENTINEL_SCHEMES:
            return _sentinel_client(url, decode_responses, lean)
        return redis.Redis.from_url(url, decode_responses=decode_responses, socket_connect_timeout=_CONNECT_TIMEOUT_S,
                                    **_handshake(lean))
    except ValueError as err:
        raise InputError(f"bad Redis URL {redact_url(url)}: {err}") from None


def _cluster_client(url: str, decode_responses: bool) -> RedisCluster:
    parts = urlsplit(url)
    if parts.path.strip("/") not in ("", "0"):
        raise InputError(f"bad Redis URL {redact_url(url)}: a cluster has only database 0")
    user, password = _credentials(parts.netloc)
    opts = _options(parts.query)
    opts.pop("sentinel_password", None)
    opts.pop("sentinel_username", None)
    nodes = [ClusterNode(host, port) for host, port in _hosts(parts.netloc, url)]  # type: ignore[no-untyped-call]
    return RedisCluster(
        startup_nodes=nodes, username=user, password=password, ssl=_scheme(url) == "rediss+cluster",
        decode_responses=decode_responses, **opts,
    )


def _sentinel_client(url: str, decode_responses: bool, lean: bool) -> redis.Redis:
    parts = urlsplit(url)
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise InputError(f"bad Redis URL {redact_url(url)}: give redis+sentinel://host:port[,...]/<service>[/<db>]")
    service, db = unquote(path[0]), int(path[1]) if len(path) == 2 else 0
    user, password = _credentials(parts.netloc)
    opts = _options(parts.query)
    sentinel_kwargs: dict[str, Any] = {"socket_connect_timeout": opts["socket_connect_timeout"]}
    if "sentinel_password" in opts:
        sentinel_kwargs["password"] = opts.pop("sentinel_password")
    if "sentinel_username" in opts:
        sentinel_kwargs["username"] = opts.pop("sentinel_username")
    sentinel = Sentinel(
        _hosts(parts.netloc, url), sentinel_kwargs=sentinel_kwargs, **opts
    )
    master: redis.Redis = sentinel.master_for(
        service, db=db, username=user, password=password, decode_responses=decode_responses,
        ssl=_scheme(url) == "rediss+sentinel", **_handshake(lean),
    )
    return master


def rq_connection(url: str, *, lean: bool = False) -> redis.Redis:
    """A bytes client for RQ's queue on ``url`` (RQ needs one server: not a cluster).

    ``lean`` for a worker: each forked work-horse opens a new connection for RQ's bookkeeping.
    """
    if _scheme(url) in CLUSTER_SCHEMES:
        raise InputError("RQ cannot use a Redis Cluster: give --rq-redis-url (a standalone or Sentinel Redis)")
    client = client_from_url(url, decode_responses=False, lean=lean)
    assert isinstance(client, redis.Redis)
    return client


def client_url(client: Any) -> str:
    """Where ``client`` connects, as a URL without the password (for error messages)."""
    if isinstance(client, RedisCluster):
        nodes = client.get_nodes()  # type: ignore[no-untyped-call]
        names = sorted(node.name for node in nodes) or ["?"]
        return f"redis+cluster://{','.join(names)}/"
    pool = client.connection_pool
    kw = pool.connection_kwargs
    if isinstance(pool, SentinelConnectionPool):
        sentinels = pool.sentinel_manager.sentinels
        hosts = ",".join(
            f"{s.connection_pool.connection_kwargs.get('host')}:{s.connection_pool.connection_kwargs.get('port')}"
            for s in sentinels
        )
        return f"redis+sentinel://{hosts}/{pool.service_name}/{kw.get('db', 0)}"
    if "path" in kw:
        path = kw["path"]
        return f"unix://{path.decode() if isinstance(path, bytes) else path}"
    return f"redis://{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"


def pipelined(client: redis.Redis, commands: Sequence[Sequence[str | int | float]]) -> list[Any]:
    """Send ``commands`` to one server in one round trip and read their replies, in order; an error reply stays
    in its place as the ResponseError it is (what ``pipeline(transaction=False).execute(raise_on_error=False)``
    gives). The commands are packed by hiredis: redis-py's pipeline runs every argument through its Python
    encoder first, which cost 42-68 µs for a complete_run call (34 arguments) where hiredis takes 7 µs. A lost
    connection is retried with the client's own Retry, as redis-py's pipelines retry it, so ``commands`` must be
    safe to send twice (every run end is: a repeat is answered as one)."""
    packed = b"".join(hiredis.pack_command(tuple(command)) for command in commands)  # type: ignore[arg-type]
    pool = client.connection_pool
    conn = pool.get_connection()

    def send_and_read() -> list[Any]:
        conn.send_packed_command([packed])  # type: ignore[no-untyped-call]
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(conn.read_response())
            except redis.exceptions.ResponseError as err:
                replies.append(err)
        return replies

    try:
        return conn.retry.call_with_retry(send_and_read, lambda _err: conn.disconnect())  # type: ignore[no-untyped-call]
    finally:
        pool.release(conn)
