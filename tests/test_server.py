"""The HTTP API (``server.app``): every route, auth, error mapping, and the pull-style agent flow."""

from __future__ import annotations

import json
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import FakeClock

pytest.importorskip("fastapi")

from fastapi import FastAPI

with warnings.catch_warnings():  # newer Starlette asks for httpx2 and warns when it only finds httpx
    warnings.filterwarnings("ignore", message=".*httpx2.*")
    from fastapi.testclient import TestClient

from clawq.broker import Broker, ClawqError, InputError, TaskStatus, parse_config
from clawq.server.app import SKIP_REASONS_HEADER, create_app, is_loopback, serve

TOKEN = "s3cret-Token_42"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CLAIM_FIELDS = {"claimed", "task_id", "board", "model", "provider", "run_id", "run_count", "attempt",
                "lease_deadline"}
#: What ClawTrol's TaskSerializer gives an agent, beside the claim (``model`` and ``board`` are the claim's).
CLAWTROL_TASK_FIELDS = {"id", "name", "description", "status"}
CLAWTROL_HEALTH_KEYS = {"now", "in_night_window", "max_concurrent", "active_in_progress", "available_slots",
                        "queue_depth", "queue_depth_by_board", "inflight_by_model", "inflight_by_provider",
                        "model_limits_active"}


# -- helpers ----------------------------------------------------------------------------------------------
def snapshot(r: redis.Redis) -> dict[Any, tuple[Any, Any]]:
    """Every key with its type, its value (type-aware) and whether it has a TTL."""
    out: dict[Any, tuple[Any, Any]] = {}
    for key in sorted(r.scan_iter(count=1000)):
        kind = r.type(key)
        value: Any
        if kind == b"string":
            value = r.get(key)
        elif kind == b"hash":
            value = r.hgetall(key)
        elif kind == b"list":
            value = r.lrange(key, 0, -1)
        elif kind == b"set":
            value = frozenset(r.smembers(key))
        elif kind == b"zset":
            value = r.zrange(key, 0, -1, withscores=True)
        elif kind == b"stream":
            value = r.xrange(key)
        else:
            value = None
        out[key] = (kind, (value, r.pttl(key) > 0))
    return out


def error_of(resp: Any) -> str:
    doc = resp.json()
    assert set(doc) == {"error"}, doc
    message: str = doc["error"]
    assert message and "\n" not in message
    return message


def outcome_doc(task_id: int, run_id: str, *, requeue: bool = False, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "version": "1",
        "task_id": task_id,
        "run_id": run_id,
        "needs_follow_up": requeue,
        "recommended_action": "requeue_same_task" if requeue else "in_review",
        "summary": "did the thing",
        "achieved": ["step one"],
        "evidence": "tests pass",
        "remaining": [],
        "model_used": "codex",
    }
    if requeue:
        doc["next_prompt"] = "now do the second half"
    doc.update(extra)
    return doc


@pytest.fixture
def static_dir(tmp_path: Path) -> Path:
    return tmp_path / "static"


@pytest.fixture
def client(broker: Broker, static_dir: Path) -> Iterator[TestClient]:
    broker.load_config(parse_config({"night_mode": None}))
    with TestClient(create_app(broker, static_dir=static_dir)) as c:
        yield c


@pytest.fixture
def authed(broker: Broker, static_dir: Path) -> Iterator[TestClient]:
    broker.load_config(parse_config({"night_mode": None}))
    with TestClient(create_app(broker, TOKEN, static_dir=static_dir)) as c:
        yield c


# -- tasks ------------------------------------------------------------------------------------------------
def test_add_then_get_task(client: TestClient, broker: Broker) -> None:
    resp = client.post("/api/v1/tasks", json={"board": "web", "title": "fix it", "chain": "coding",
                                              "prompt": "details"})
    assert resp.status_code == 201
    assert resp.json() == {"task_id": 1, "board": "web", "status": "up_next", "due_at": None}
    resp = client.post("/api/v1/tasks", json={"board": "web", "title": "pinned", "model": "opus", "id": 40})
    assert resp.status_code == 201
    assert resp.json()["task_id"] == 40
    got = client.get("/api/v1/tasks/1")
    assert got.status_code == 200
    assert got.json() == broker.get_task(1).model_dump(mode="json")
    assert got.json()["prompt"] == "details"
    assert client.get("/api/v1/tasks/40").json()["model"] == "opus"


def test_missing_task_is_404(client: TestClient) -> None:
    resp = client.get("/api/v1/tasks/77")
    assert resp.status_code == 404
    assert error_of(resp) == "task 77 not found"


@pytest.mark.parametrize("path", ["/api/v1/tasks/0", "/api/v1/tasks/abc", "/api/v1/tasks/100000000000000"])
def test_bad_task_id_in_path_is_422(client: TestClient, path: str) -> None:
    resp = client.get(path)
    assert resp.status_code == 422
    assert "task_id" in error_of(resp)


def test_duplicate_task_id_is_409_and_writes_nothing(client: TestClient, r: redis.Redis) -> None:
    assert client.post("/api/v1/tasks", json={"board": "web", "title": "a", "chain": "coding", "id": 5}).status_code \
        == 201
    before = snapshot(r)
    resp = client.post("/api/v1/tasks", json={"board": "ops", "title": "b", "chain": "coding", "id": 5})
    assert resp.status_code == 409
    assert error_of(resp) == "task 5 already exists"
    assert snapshot(r) == before


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"board": "web", "chain": "coding"}, "title: Field required"),
        ({"board": "web", "title": "t"}, "give exactly one of chain or model"),
        ({"board": "web", "title": "t", "chain": "coding", "model": "opus"}, "give exactly one of chain or model"),
        ({"board": "web", "title": "t", "chain": "nope"}, "unknown chain 'nope'"),
        ({"board": "web", "title": "t", "model": "gpt-99"}, "unknown model 'gpt-99'"),
        ({"board": "bad board!", "title": "t", "chain": "coding"}, "bad board name"),
        ({"board": "web", "title": "   ", "chain": "coding"}, "title must not be empty"),
        ({"board": "web", "title": 7, "chain": "coding"}, "title: Input should be a valid string"),
        ({"board": "web", "title": "t", "chain": "coding", "id": "5"}, "id: Input should be a valid integer"),
        ({"board": "web", "title": "t", "chain": "coding", "id": 0}, "id: Input should be greater than or equal"),
        ({"board": "web", "title": "t", "chain": "coding", "id": True}, "id: Input should be a valid integer"),
        ({"board": "web", "title": "t", "chain": "coding", "prio": 1}, "prio: Extra inputs are not permitted"),
        ({"board": "web", "title": "t", "chain": "coding", "prompt": "x" * (256 * 1024 + 1)}, "prompt is larger"),
        (["web"], "body: send a JSON object (Content-Type: application/json)"),
    ],
)
def test_bad_add_is_422_and_writes_nothing(client: TestClient, r: redis.Redis, body: Any, needle: str) -> None:
    assert client.post("/api/v1/tasks", json={"board": "web", "title": "seed", "chain": "coding"}).status_code == 201
    before = snapshot(r)
    resp = client.post("/api/v1/tasks", json=body)
    assert resp.status_code == 422
    assert needle in error_of(resp)
    assert snapshot(r) == before


def test_malformed_json_is_422(client: TestClient, r: redis.Redis) -> None:
    before = snapshot(r)
    resp = client.post("/api/v1/tasks", content=b"{not json", headers={"Content-Type": "application/json"})
    assert resp.status_code == 422
    assert error_of(resp).startswith("invalid request: body is not valid JSON: Expecting property name")
    assert snapshot(r) == before


# -- health -----------------------------------------------------------------------------------------------
def test_queue_health_is_the_health_document(client: TestClient, broker: Broker, clock: FakeClock) -> None:
    for board in ("web", "ops", "web"):
        broker.add(board, "t", chain="coding")
    c = broker.claim()
    broker.fail(c.task_id, c.run_id, "agent timed out after 60 minutes")
    broker.set_cooldown("opus", 120)
    clock.advance(30)
    resp = client.get("/api/v1/tasks/queue_health")
    assert resp.status_code == 200
    doc = resp.json()
    clawq = json.loads(json.dumps(broker.health()))
    mine = {k: doc[k] for k in clawq}
    for d in (mine, clawq):  # Redis's used_memory moves between two reads (client buffers): not compared
        d["redis"] = {k: v for k, v in d["redis"].items() if k != "used_memory"}
    assert mine == clawq  # clawq's own keys, unchanged
    assert doc["models"]["opus"]["cooldown_remaining_s"] == pytest.approx(90, abs=0.01)
    assert set(doc) - set(clawq) == CLAWTROL_HEALTH_KEYS
    assert (doc["queue_depth"], doc["active_in_progress"]) == (3, 0)
    assert doc["queue_depth_by_board"] == {"web": 2, "ops": 1}
    assert (doc["inflight_by_model"], doc["inflight_by_provider"]) == ({}, {})
    assert doc["model_limits_active"] == ["opus"]
    assert doc["max_concurrent"] == doc["available_slots"] == clawq["global"]["max_concurrent"]
    c = broker.claim()
    doc = client.get("/api/v1/tasks/queue_health").json()
    assert (doc["queue_depth"], doc["active_in_progress"]) == (2, 1)
    assert doc["inflight_by_model"] == {c.model: 1}
    assert doc["inflight_by_provider"] == {c.provider: 1}
    assert doc["available_slots"] == doc["max_concurrent"] - 1


# -- claiming ---------------------------------------------------------------------------------------------
def test_next_claims_a_task(client: TestClient, broker: Broker, clock: FakeClock) -> None:
    tid = broker.add("web", "t", chain="coding", prompt="do it")
    resp = client.get("/api/v1/tasks/next")
    assert resp.status_code == 200
    doc = resp.json()
    assert set(doc) == CLAIM_FIELDS | CLAWTROL_TASK_FIELDS
    assert doc["claimed"] is True
    assert (doc["id"], doc["name"], doc["description"], doc["status"]) == (tid, "t", "do it", "in_progress")
    assert (doc["task_id"], doc["board"], doc["model"], doc["provider"]) == (tid, "web", "codex", "openai")
    assert (doc["run_count"], doc["attempt"]) == (1, 1)
    assert doc["lease_deadline"] == pytest.approx(clock() + 23 * 60, abs=0.01)
    task = broker.get_task(tid)
    assert (task.status, task.run_id) == (TaskStatus.IN_PROGRESS, doc["run_id"])


def test_next_without_work_is_204_with_skip_reasons(client: TestClient, broker: Broker) -> None:
    resp = client.get("/api/v1/tasks/next")
    assert resp.status_code == 204
    assert resp.content == b""
    assert json.loads(resp.headers[SKIP_REASONS_HEADER]) == {}
    broker.add("web", "a", chain="coding")
    broker.add("web", "b", chain="coding")
    assert client.get("/api/v1/tasks/next").status_code == 200
    resp = client.get("/api/v1/tasks/next")
    assert resp.status_code == 204
    assert json.loads(resp.headers[SKIP_REASONS_HEADER]) == {"board_busy": 1}


def test_next_is_not_a_head_or_post(client: TestClient, broker: Broker) -> None:
    broker.add("web", "a", chain="coding")
    assert client.head("/api/v1/tasks/next").status_code == 405
    resp = client.post("/api/v1/tasks/next")
    assert resp.status_code in (405, 422)
    assert broker.get_task(1).status is TaskStatus.UP_NEXT


def test_heartbeat_extends_the_lease(client: TestClient, broker: Broker, clock: FakeClock) -> None:
    tid = broker.add("web", "t", chain="coding")
    run_id = client.get("/api/v1/tasks/next").json()["run_id"]
    clock.advance(600)
    resp = client.post(f"/api/v1/tasks/{tid}/heartbeat", json={"run_id": run_id})
    assert resp.status_code == 200
    assert resp.json() == {"task_id": tid, "run_id": run_id, "lease_deadline": pytest.approx(clock() + 1200, abs=0.01)}
    assert broker.get_task(tid).lease_deadline == pytest.approx(clock() + 1200, abs=0.01)


def test_heartbeat_errors(client: TestClient, broker: Broker, r: redis.Redis) -> None:
    tid = broker.add("web", "t", chain="coding")
    run_id = client.get("/api/v1/tasks/next").json()["run_id"]
    before = snapshot(r)
    fenced = client.post(f"/api/v1/tasks/{tid}/heartbeat", json={"run_id": str(uuid.uuid4())})
    assert fenced.status_code == 409
    assert "fenced" in error_of(fenced)
    missing = client.post("/api/v1/tasks/99/heartbeat", json={"run_id": run_id})
    assert missing.status_code == 404
    for body in ({"run_id": "nope"}, {"run_id": run_id.upper()}, {}, {"run_id": run_id, "x": 1}, {"run_id": 5}):
        resp = client.post(f"/api/v1/tasks/{tid}/heartbeat", json=body)
        assert resp.status_code == 422, body
        assert "run_id" in error_of(resp) or "x" in error_of(resp)
    assert "canonical" in error_of(client.post(f"/api/v1/tasks/{tid}/heartbeat", json={"run_id": "nope"}))
    assert snapshot(r) == before


# -- outcomes ---------------------------------------------------------------------------------------------
def test_pull_agent_flow(client: TestClient, broker: Broker, clock: FakeClock) -> None:
    resp = client.post("/api/v1/tasks", json={"board": "web", "title": "two parts", "chain": "coding",
                                              "prompt": "do both halves"})
    tid = resp.json()["task_id"]
    first = client.get("/api/v1/tasks/next").json()
    assert first["task_id"] == tid
    clock.advance(60)
    assert client.post(f"/api/v1/tasks/{tid}/heartbeat", json={"run_id": first["run_id"]}).status_code == 200
    resp = client.post("/api/v1/hooks/task_outcome", json=outcome_doc(tid, first["run_id"], requeue=True))
    assert resp.status_code == 200
    assert resp.json() == {"task_id": tid, "status": "up_next", "run_count": 1, "repeated": False, "note": "",
                           "success": True, "idempotent": False, "run_number": 1}
    again = client.get("/api/v1/tasks/next").json()
    assert again["task_id"] == tid
    assert again["run_id"] != first["run_id"]
    assert again["run_count"] == 2
    resp = client.post("/api/v1/hooks/task_outcome", json=outcome_doc(tid, again["run_id"]))
    assert resp.status_code == 200
    assert resp.json()["status"] == "in_review"
    task = client.get(f"/api/v1/tasks/{tid}").json()
    assert task["status"] == "in_review"
    assert task["run_count"] == 2
    assert task["context"][0]["next_prompt"] == "now do the second half"
    assert task["context"][1]["summary"] == "did the thing"
    assert task["context"][1]["achieved"] == ["step one"]
    assert client.get("/api/v1/tasks/next").status_code == 204


def test_repeated_outcome_is_idempotent(client: TestClient, broker: Broker, r: redis.Redis) -> None:
    tid = broker.add("web", "t", chain="coding")
    run_id = broker.claim().run_id
    doc = outcome_doc(tid, run_id)
    first = client.post("/api/v1/hooks/task_outcome", json=doc)
    assert first.status_code == 200
    assert first.json()["repeated"] is False
    after_first = snapshot(r)
    second = client.post("/api/v1/hooks/task_outcome", json=doc)
    assert second.status_code == 200
    assert second.json() == {**first.json(), "repeated": True, "idempotent": True, "note": ""}
    assert snapshot(r) == after_first


def test_outcome_of_a_fenced_run_is_409(client: TestClient, broker: Broker, r: redis.Redis) -> None:
    tid = broker.add("web", "t", chain="coding")
    run_id = broker.claim().run_id
    before = snapshot(r)
    resp = client.post("/api/v1/hooks/task_outcome", json=outcome_doc(tid, str(uuid.uuid4())))
    assert resp.status_code == 409
    assert "fenced" in error_of(resp)
    assert snapshot(r) == before
    assert client.post("/api/v1/hooks/task_outcome", json=outcome_doc(tid, run_id)).status_code == 200
    after = snapshot(r)
    different = client.post("/api/v1/hooks/task_outcome", json=outcome_doc(tid, run_id, summary="another story"))
    assert different.status_code == 409  # not a repeat: a different outcome for a finished run
    assert snapshot(r) == after


def test_outcome_for_missing_task_is_404(client: TestClient, broker: Broker) -> None:
    broker.add("web", "t", chain="coding")
    resp = client.post("/api/v1/hooks/task_outcome", json=outcome_doc(99, str(uuid.uuid4())))
    assert resp.status_code == 404
    assert error_of(resp) == "task 99 not found"


def test_outcome_defaults_follow_clawtrol(client: TestClient, broker: Broker) -> None:
    tid = broker.add("web", "t", chain="coding")
    run_id = broker.claim().run_id
    minimal = {"version": "1", "task_id": tid, "run_id": run_id, "summary": None, "future_field": {"x": 1}}
    resp = client.post("/api/v1/hooks/task_outcome", json=minimal)
    assert resp.status_code == 200
    assert resp.json()["status"] == "in_review"


RUN = "0b7a3c1e-5f2d-4e8a-9c6b-1d2e3f4a5b6c"


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"version": "2"}, "version: invalid version '2'"),
        ({"version": 2}, "version: invalid version '2'"),
        ({"version": 1.0}, "version: invalid version '1.0'"),
        ({"version": True}, "version: invalid version"),
        ({"version": None}, "version: Field required"),
        ({"run_id": "not-a-uuid"}, "run_id: invalid run_id 'not-a-uuid': a UUID in 8-4-4-4-12 form (any case)"),
        ({"run_id": RUN.replace("-", "")}, "run_id: invalid run_id"),
        ({"run_id": "0" * 36}, "a UUID in 8-4-4-4-12 form"),
        ({"run_id": None}, "run_id: Field required"),
        ({"run_id": 5}, "run_id: Input should be a valid string"),
        ({"recommended_action": "delete"}, "recommended_action: invalid recommended_action 'delete': one of in_review"),
        ({"recommended_action": ["x"]}, "recommended_action: invalid recommended_action"),
        ({"recommended_action": "requeue_same_task", "needs_follow_up": True},
         "next_prompt is required for requeue_same_task"),
        ({"recommended_action": "requeue_same_task", "needs_follow_up": True, "next_prompt": "  "},
         "next_prompt is required"),
        ({"recommended_action": "requeue_same_task", "needs_follow_up": None}, "next_prompt is required"),
        ({"needs_follow_up": "maybe"}, "needs_follow_up: not a boolean: 'maybe'"),
        ({"needs_follow_up": 2}, "needs_follow_up: not a boolean"),
        ({"task_id": "1x"}, "task_id: Input should be a valid integer"),
        ({"task_id": 0}, "task_id: Input should be greater than or equal to 1"),
        ({"task_id": "0"}, "task_id: Input should be greater than or equal to 1"),
        ({"task_id": True}, "task_id: Input should be a valid integer"),
        ({"summary": 5}, "summary: Input should be a valid string"),
        ({"achieved": [1, 2]}, "achieved"),
        ({"summary": "x" * (256 * 1024 + 1)}, "summary is larger than 262144 bytes"),
    ],
)
def test_bad_outcome_is_422_and_writes_nothing(
    client: TestClient, broker: Broker, r: redis.Redis, change: dict[str, Any], needle: str
) -> None:
    tid = broker.add("web", "t", chain="coding")
    run_id = broker.claim().run_id
    doc = {k: v for k, v in {**outcome_doc(tid, run_id), **change}.items() if v is not None}
    before = snapshot(r)
    resp = client.post("/api/v1/hooks/task_outcome", json=doc)
    assert resp.status_code == 422
    message = error_of(resp)
    assert message.startswith("invalid request: ")
    assert needle in message
    assert snapshot(r) == before
    assert broker.get_task(tid).status is TaskStatus.IN_PROGRESS


def test_outcome_body_must_be_an_object(client: TestClient, r: redis.Redis) -> None:
    before = snapshot(r)
    bodies: list[Any] = [[], "x", None]
    for body in bodies:
        resp = client.post("/api/v1/hooks/task_outcome", json=body)
        assert resp.status_code == 422
        assert error_of(resp).startswith("invalid request: body: send a JSON object (Content-Type: application/json)")
    assert snapshot(r) == before


# -- errors -----------------------------------------------------------------------------------------------
def test_unknown_route_and_method_have_json_errors(client: TestClient) -> None:
    resp = client.get("/api/v1/nope")
    assert resp.status_code == 404
    assert error_of(resp) == "not found: /api/v1/nope"
    resp = client.delete("/api/v1/tasks/1")
    assert resp.status_code == 405
    assert "DELETE" in error_of(resp)


def test_unexpected_error_is_500_json(broker: Broker, static_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom() -> None:
        raise RuntimeError("kaput\nsecond line")

    monkeypatch.setattr(broker, "health", boom)
    with TestClient(create_app(broker, static_dir=static_dir), raise_server_exceptions=False) as c:
        resp = c.get("/api/v1/tasks/queue_health")
    assert resp.status_code == 500
    assert error_of(resp) == "internal error: RuntimeError: kaput second line"


def test_redis_down_is_503(static_dir: Path) -> None:
    client = redis.Redis(host="127.0.0.1", port=1, decode_responses=True, socket_connect_timeout=1)
    b = Broker(client, "down")
    with TestClient(create_app(b, static_dir=static_dir)) as c:
        for method, path, body in (
            ("GET", "/api/v1/tasks/queue_health", None),
            ("GET", "/api/v1/tasks/next", None),
            ("GET", "/api/v1/tasks/1", None),
            ("POST", "/api/v1/tasks", {"board": "web", "title": "t", "chain": "coding"}),
            ("GET", "/metrics", None),
        ):
            resp = c.request(method, path, json=body)
            assert resp.status_code == 503, path
            assert error_of(resp).startswith("cannot reach Redis")
    client.close()


# -- auth -------------------------------------------------------------------------------------------------
ROUTES: list[tuple[str, str, Any]] = [
    ("GET", "/api/v1/tasks/queue_health", None),
    ("GET", "/api/v1/tasks/next", None),
    ("GET", "/api/v1/tasks/1", None),
    ("POST", "/api/v1/tasks", {"board": "web", "title": "t", "chain": "coding"}),
    ("POST", "/api/v1/tasks/1/heartbeat", {"run_id": RUN}),
    ("POST", "/api/v1/hooks/task_outcome", outcome_doc(1, RUN)),
    ("PATCH", "/api/v1/tasks/1/claim", {"session_id": "s"}),
    ("PATCH", "/api/v1/tasks/1", {"task": {"activity_note": "n"}}),
    ("PATCH", "/api/v1/tasks/1/unclaim", None),
    ("POST", "/api/v1/tasks/1/report_rate_limit", {"model_name": "codex", "error_message": "429"}),
    ("POST", "/api/v1/tasks/1/agent_complete", {"output": "done", "files": []}),
    ("GET", "/", None),
    ("GET", "/static/app.js", None),
    ("GET", "/openapi.json", None),
    ("GET", "/docs", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_token_is_required(authed: TestClient, broker: Broker, r: redis.Redis,
                           method: str, path: str, body: Any) -> None:
    broker.add("web", "seed", chain="coding")
    before = snapshot(r)
    hook_route = path.startswith("/api/v1/hooks/")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                    {"Authorization": f"Basic {TOKEN}"}, {"Authorization": f"Bearer {TOKEN}x"},
                    {"Authorization": "Bearer "}, {"X-Hook-Token": "wrong"}, {"X-Hook-Token": TOKEN.upper()},
                    *([] if hook_route else [{"X-Hook-Token": TOKEN}])):  # the hook header opens hooks only
        resp = authed.request(method, path, json=body, headers=headers)
        assert resp.status_code == 401, (path, headers)
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        message = error_of(resp)
        assert "bearer token" in message or (hook_route and message == "invalid X-Hook-Token"), message
    assert snapshot(r) == before  # a refused request never reaches the broker


def test_hook_token_never_opens_a_path_outside_the_hooks(authed: TestClient, broker: Broker, r: redis.Redis) -> None:
    broker.add("web", "seed", chain="coding")
    before = snapshot(r)
    hook = {"X-Hook-Token": TOKEN}
    for path in ("/api/v1/hooks/../tasks/next", "/api/v1/hooks/%2e%2e/tasks/next",
                 "/API/v1/hooks/task_outcome", "/api/v1/hooksx/task_outcome", "/api/v1/tasks/next"):
        resp = authed.get(path, headers=hook)
        assert resp.status_code == 401, path
        assert error_of(resp).startswith("missing bearer token")
    assert authed.post("/api/v1/hooks/task_outcome", json={}, headers=hook).status_code == 422  # it opens hooks
    assert snapshot(r) == before


def test_wrong_token_says_invalid(authed: TestClient) -> None:
    resp = authed.get("/api/v1/tasks/queue_health", headers={"Authorization": "Bearer nope"})
    assert error_of(resp) == "invalid bearer token"
    assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
    resp = authed.get("/api/v1/tasks/queue_health")
    assert error_of(resp).startswith("missing bearer token")


def test_right_token_passes(authed: TestClient, broker: Broker, static_dir: Path) -> None:
    assert authed.get("/api/v1/tasks/queue_health", headers=AUTH).status_code == 200
    assert authed.get("/api/v1/tasks/queue_health", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200
    resp = authed.post("/api/v1/tasks", json={"board": "web", "title": "t", "chain": "coding"}, headers=AUTH)
    assert resp.status_code == 201
    claim = authed.get("/api/v1/tasks/next", headers=AUTH).json()
    assert authed.post("/api/v1/tasks/1/heartbeat", json={"run_id": claim["run_id"]}, headers=AUTH).status_code == 200
    resp = authed.post("/api/v1/hooks/task_outcome", json=outcome_doc(1, claim["run_id"]), headers=AUTH)
    assert resp.status_code == 200
    assert authed.get("/api/v1/tasks/1", headers=AUTH).json()["status"] == "in_review"
    spec = authed.get("/openapi.json", headers=AUTH).json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_metrics_stay_open(authed: TestClient) -> None:
    assert authed.get("/metrics").status_code == 200
    assert authed.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 200


def test_query_token_only_opens_the_page(authed: TestClient, static_dir: Path) -> None:
    static_dir.mkdir()
    (static_dir / "index.html").write_text("<!doctype html><title>clawq</title>")
    (static_dir / "app.js").write_text("console.log(1)")
    resp = authed.get("/", params={"token": TOKEN})
    assert resp.status_code == 200
    assert "<title>clawq</title>" in resp.text
    assert resp.headers["Referrer-Policy"] == "no-referrer"
    assert authed.get("/", params={"token": "wrong"}).status_code == 401
    assert authed.get("/", headers=AUTH).status_code == 200
    assert authed.get("/api/v1/tasks/queue_health", params={"token": TOKEN}).status_code == 401
    assert authed.get("/static/app.js", params={"token": TOKEN}).status_code == 401
    assert authed.get("/static/app.js", headers=AUTH).text == "console.log(1)"
    assert authed.get("/metrics", params={"token": "wrong"}).status_code == 200


def test_no_token_means_open(client: TestClient) -> None:
    assert client.get("/api/v1/tasks/queue_health").status_code == 200
    assert client.get("/api/v1/tasks/queue_health", headers={"Authorization": "Bearer anything"}).status_code == 200
    assert "securitySchemes" not in client.get("/openapi.json").json().get("components", {})


# -- page and static files --------------------------------------------------------------------------------
def test_page_missing_is_404(client: TestClient) -> None:
    resp = client.get("/")
    assert resp.status_code == 404
    assert "index.html is missing" in error_of(resp)
    resp = client.get("/static/app.js")
    assert resp.status_code == 404
    error_of(resp)


def test_page_and_static_files(client: TestClient, static_dir: Path, tmp_path: Path) -> None:
    static_dir.mkdir()
    (static_dir / "index.html").write_text("<!doctype html><p>board</p>")
    (static_dir / "style.css").write_text("p{}")
    (tmp_path / "secret.txt").write_text("TOP SECRET")
    resp = client.get("/")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    assert resp.headers["Cache-Control"] == "no-store"
    assert client.get("/static/style.css").text == "p{}"
    assert client.get("/static/index.html").status_code == 200
    for path in ("/static/../secret.txt", "/static/%2e%2e/secret.txt", "/static/nope.js"):
        resp = client.get(path)
        assert resp.status_code == 404, path
        assert "TOP SECRET" not in resp.text


def test_openapi_lists_the_routes(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    assert set(paths) >= {"/api/v1/tasks/queue_health", "/api/v1/tasks/next", "/api/v1/tasks",
                          "/api/v1/tasks/{task_id}", "/api/v1/tasks/{task_id}/heartbeat",
                          "/api/v1/hooks/task_outcome", "/metrics"}
    assert "204" in paths["/api/v1/tasks/next"]["get"]["responses"]
    assert "OutcomePayloadV1" in spec["components"]["schemas"]
    assert client.get("/docs").status_code == 200


# -- serve ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.com", ""])
def test_serve_refuses_public_host_without_token(host: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("uvicorn.run", lambda *a, **kw: pytest.fail("must not start"))
    for token in (None, ""):
        with pytest.raises(InputError, match="needs an API token") as info:
            serve("redis://127.0.0.1:1/0", "default", host=host, token=token)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.9.8.7", True), ("localhost", True), ("::1", True), ("[::1]", True),
    ("0.0.0.0", False), ("::", False), ("10.0.0.1", False), ("example.com", False),
])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_serve_runs_uvicorn(redis_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    calls: list[tuple[Any, str]] = []
    monkeypatch.setattr(uvicorn.Server, "run",
                        lambda self, sockets: calls.append((self.config, sockets[0].getsockname()[0])))
    said: list[str] = []
    serve(redis_url, namespace, port=0, say=said.append)
    serve(redis_url, namespace, host="0.0.0.0", port=0, token=TOKEN, say=said.append)
    assert [host for _, host in calls] == ["127.0.0.1", "0.0.0.0"]
    assert all(isinstance(config.app, FastAPI) and config.log_level == "warning" for config, _ in calls)
    assert [line.split("/ (")[0].rsplit(":", 1)[0] for line in said] == [
        "clawq serve: listening on http://127.0.0.1", "clawq serve: listening on http://0.0.0.0"]


def test_serve_refuses_a_port_in_use_before_anything_else(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda *a, **kw: pytest.fail("must not start"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ClawqError, match=f"cannot listen on 127.0.0.1:{port}: Address already in use$"):
            serve("redis://127.0.0.1:1/0", "default", port=port)


def test_add_not_before_and_night_only_over_http(client: TestClient, broker: Broker) -> None:
    soon = time.time() + 3600
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(soon))
    resp = client.post("/api/v1/tasks", json={"board": "web", "title": "later", "chain": "coding", "not_before": iso})
    assert resp.status_code == 201
    body = resp.json()
    assert body["status"] == "scheduled" and body["due_at"] == int(soon)
    task = client.get(f"/api/v1/tasks/{body['task_id']}").json()
    assert task["status"] == "scheduled" and task["not_before"] == int(soon) and task["night_only"] is False
    broker.load_config(parse_config({"night_mode": {"timezone": "UTC", "start": "00:00", "end": "00:01"}}))
    resp = client.post("/api/v1/tasks", json={"board": "ops", "title": "n", "chain": "coding", "night_only": True})
    assert resp.status_code == 201
    assert client.get(f"/api/v1/tasks/{resp.json()['task_id']}").json()["night_only"] is True


@pytest.mark.parametrize("extra", [
    {"not_before": "not a time"},
    {"not_before": "2999-01-01T00:00:00Z"},
    {"not_before": 1700000000},
    {"night_only": "yes"},
])
def test_add_with_a_bad_time_is_422_and_writes_nothing(client: TestClient, broker: Broker,
                                                      extra: dict[str, Any]) -> None:
    resp = client.post("/api/v1/tasks", json={"board": "web", "title": "t", "chain": "coding", **extra})
    assert resp.status_code == 422, resp.text
    assert broker.list_tasks() == []
