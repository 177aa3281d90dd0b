"""ClawTrol's own clients against a real ``clawq serve`` process.

ClawTrol's integration tests of ``POST /api/v1/hooks/task_outcome`` (``test/controllers/api/v1/
hooks_controller_test.rb`` and ``hooks_controller_expanded_test.rb`` in wolverin0/clawtrol) are ported here,
each in both encodings its clients use: a Rails form (``achieved[]=thing1``) and JSON. Only fencing is adapted:
the run id is the one a claim handed out, not any fresh UUID. Then the agent loop of ClawTrol's skill (poll,
claim, report a rate limit or unclaim or complete) runs as bash with curl and jq.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import redis
from redis_servers import HOST, RedisServer, free_port

pytest.importorskip("fastapi", reason="fastapi is not installed (the server extra)")
pytest.importorskip("uvicorn", reason="uvicorn is not installed (the server extra)")

from helpers import stop_group

from clawq.broker import Broker, TaskStatus, parse_config

TOKEN = "hook-and-api-Token_7"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
HOOK = {"X-Hook-Token": TOKEN}
ENCODINGS = ("form", "json")
ROOT = Path(__file__).resolve().parent.parent


# -- a real `clawq serve` ---------------------------------------------------------------------------------
@dataclass
class Served:
    url: str
    broker: Broker
    redis: redis.Redis
    log: Path

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10)


def _wait_up(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"clawq serve exited with {proc.returncode}: {log.read_text(errors='replace')[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/metrics", timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    pytest.fail(f"clawq serve did not answer: {log.read_text(errors='replace')[-2000:]}")


@pytest.fixture(scope="module")
def served(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One ``clawq serve`` (with an API token) per module and Redis binary, on its own namespace."""
    if not redis_server.running:
        redis_server.restart()
    ns = "ct" + uuid.uuid4().hex[:10]
    broker = Broker.from_url(redis_server.url, ns)
    broker.load_config(parse_config({"night_mode": None}))
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLAWQ_")}
    env.update(CLAWQ_API_TOKEN=TOKEN, PYTHONUNBUFFERED="1")
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "clawq.cli", "serve", "--port", str(port), "--redis-url", redis_server.url,
             "--namespace", ns],
            cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    client = redis.Redis.from_url(redis_server.url)
    try:
        url = f"http://{HOST}:{port}"
        _wait_up(url, proc, log)
        yield Served(url, broker, client, log)
    finally:
        stop_group(proc)
        keys = list(client.scan_iter(match=f"clawq:{{{ns}}}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
        broker.close()
    assert "Traceback" not in log.read_text(errors="replace"), log.read_text(errors="replace")[-3000:]


@pytest.fixture
def srv(served: Served) -> Iterator[Served]:
    """The module's server, with nothing runnable left over from the test before and no model cooling."""
    yield served
    b = served.broker
    for task in b.list_tasks():
        if not task.status.final:
            b.cancel(task.task_id)
    for model in b.cooldowns():
        b.clear_cooldown(model)


@pytest.fixture
def http(srv: Served) -> Iterator[httpx.Client]:
    with srv.http() as client:
        yield client


# -- helpers ----------------------------------------------------------------------------------------------
def rails_form(params: dict[str, Any]) -> bytes:
    """``params`` encoded as a Rails integration test posts them (Rack's nested query)."""
    pairs: list[str] = []

    def add(name: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                add(f"{name}[{k}]", v)
        elif isinstance(value, list):
            if not value:
                pairs.append(quote(f"{name}[]"))
            for v in value:
                add(f"{name}[]", v)
        elif value is None:
            pairs.append(quote(name))
        else:
            text = str(value).lower() if isinstance(value, bool) else str(value)
            pairs.append(f"{quote(name)}={quote(text, safe='')}")

    for key, val in params.items():
        add(key, val)
    return "&".join(pairs).encode()


def send(http: httpx.Client, method: str, path: str, body: dict[str, Any] | None, encoding: str,
         headers: dict[str, str] | None = None) -> httpx.Response:
    """One request with ``body`` as a Rails form or as JSON."""
    hdrs = dict(BEARER if headers is None else headers)
    if body is None:
        return http.request(method, path, headers=hdrs)
    if encoding == "form":
        hdrs["Content-Type"] = "application/x-www-form-urlencoded"
        return http.request(method, path, content=rails_form(body), headers=hdrs)
    return http.request(method, path, json=body, headers=hdrs)


def outcome(http: httpx.Client, body: dict[str, Any], encoding: str,
            headers: dict[str, str] | None = None) -> httpx.Response:
    return send(http, "POST", "/api/v1/hooks/task_outcome", body, encoding, HOOK if headers is None else headers)


def error_of(resp: httpx.Response) -> str:
    doc = resp.json()
    assert set(doc) == {"error"}, doc
    message: str = doc["error"]
    assert message and "\n" not in message
    return message


def claimed(srv: Served, http: httpx.Client, *, prompt: str = "", title: str = "a task") -> dict[str, Any]:
    """Queue one task and claim it as an agent would (``GET /api/v1/tasks/next``)."""
    tid = srv.broker.add("web", title, chain="coding", prompt=prompt)
    resp = http.get("/api/v1/tasks/next", headers=BEARER)
    assert resp.status_code == 200, resp.text
    doc: dict[str, Any] = resp.json()
    assert doc["task_id"] == tid
    return doc


def snapshot(srv: Served) -> dict[bytes, Any]:
    """Every key of the namespace with its value (a refused request must change none)."""
    r, out = srv.redis, {}
    for key in sorted(r.scan_iter(match=f"clawq:{{{srv.broker.namespace}}}:*", count=1000)):
        kind = r.type(key)
        readers = {b"string": r.get, b"hash": r.hgetall, b"list": lambda k: r.lrange(k, 0, -1),
                   b"set": r.smembers, b"zset": lambda k: r.zrange(k, 0, -1, withscores=True), b"stream": r.xrange}
        out[key] = (kind, readers[kind](key) if kind in readers else None)
    return out


def v1(task_id: int, run_id: str, **fields: Any) -> dict[str, Any]:
    return {"task_id": task_id, "version": "1", "run_id": run_id, **fields}


# -- ClawTrol's task_outcome tests, ported ------------------------------------------------------------------
@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("headers", [{}, {"X-Hook-Token": "wrong"}, {"X-Hook-Token": "bad_token"},
                                     {"Authorization": "Bearer wrong"}, {"X-Hook-Token": ""}])
def test_task_outcome_returns_unauthorized_with_bad_or_missing_token(
        srv: Served, http: httpx.Client, encoding: str, headers: dict[str, str]) -> None:
    run = claimed(srv, http)
    before = snapshot(srv)
    resp = outcome(http, v1(run["task_id"], run["run_id"], summary="x"), encoding, headers)
    assert resp.status_code == 401
    assert "token" in error_of(resp).lower()
    assert snapshot(srv) == before


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize(("change", "needle"), [
    ({"version": "99"}, "invalid version"),
    ({"run_id": "not-a-uuid"}, "invalid run_id"),
    ({"recommended_action": "hack_the_planet"}, "invalid recommended_action"),
    ({"recommended_action": "requeue_same_task", "needs_follow_up": True, "next_prompt": ""}, "next_prompt"),
    ({"recommended_action": "requeue_same_task", "needs_follow_up": True}, "next_prompt"),
])
def test_task_outcome_rejects_invalid_payload(srv: Served, http: httpx.Client, encoding: str,
                                              change: dict[str, Any], needle: str) -> None:
    run = claimed(srv, http)
    before = snapshot(srv)
    resp = outcome(http, {**v1(run["task_id"], run["run_id"]), **change}, encoding)
    assert resp.status_code == 422
    assert needle in error_of(resp)
    assert snapshot(srv) == before


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_task_outcome_creates_run_and_moves_to_in_review(srv: Served, http: httpx.Client, encoding: str) -> None:
    run = claimed(srv, http)
    tid = run["task_id"]
    resp = outcome(http, v1(tid, run["run_id"], summary="All done", recommended_action="in_review",
                            achieved=["thing1"], needs_follow_up=False), encoding)
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert doc["success"] is True
    assert {k: doc[k] for k in ("idempotent", "task_id", "run_number", "status")} == {
        "idempotent": False, "task_id": tid, "run_number": 1, "status": "in_review"}
    task = srv.broker.get_task(tid)
    assert (task.status, task.run_count) == (TaskStatus.IN_REVIEW, 1)
    assert task.context[-1]["achieved"] == ["thing1"]
    assert task.context[-1]["summary"] == "All done"


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_task_outcome_with_valid_params_records_the_run(srv: Served, http: httpx.Client, encoding: str) -> None:
    run = claimed(srv, http)
    tid = run["task_id"]
    resp = outcome(http, v1(tid, run["run_id"], summary="All tests pass", needs_follow_up=False,
                            achieved=["wrote tests"], evidence=["test output"], remaining=[]), encoding)
    assert resp.status_code == 200, resp.text
    assert resp.json()["success"] is True
    task = srv.broker.get_task(tid)
    assert task.status is TaskStatus.IN_REVIEW
    entry = task.context[-1]
    assert (entry["achieved"], entry["evidence"], entry.get("remaining", [])) == (["wrote tests"], ["test output"], [])


@pytest.mark.parametrize(("first", "second"), [("json", "json"), ("form", "form"), ("json", "form"),
                                               ("form", "json")])
def test_task_outcome_is_idempotent_on_duplicate_run_id(srv: Served, http: httpx.Client, first: str,
                                                         second: str) -> None:
    run = claimed(srv, http)
    tid = run["task_id"]
    body = v1(tid, run["run_id"], summary="Done", recommended_action="in_review", needs_follow_up=False,
              achieved=["a", "b"])
    resp = outcome(http, body, first)
    assert (resp.status_code, resp.json()["idempotent"]) == (200, False)
    after = snapshot(srv)
    again = outcome(http, body, second)  # the same outcome in the other encoding is the same outcome
    assert again.status_code == 200, again.text
    assert again.json() == {**resp.json(), "idempotent": True, "repeated": True}
    assert snapshot(srv) == after
    assert [e["run_id"] for e in srv.broker.get_task(tid).context] == [run["run_id"]]


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_task_outcome_returns_not_found_for_missing_task(srv: Served, http: httpx.Client, encoding: str) -> None:
    before = snapshot(srv)
    resp = outcome(http, v1(999999, str(uuid.uuid4()), recommended_action="in_review", needs_follow_up=False),
                   encoding)
    assert resp.status_code == 404
    assert error_of(resp) == "task 999999 not found"
    assert snapshot(srv) == before


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_task_outcome_is_fenced_to_the_claimed_run(srv: Served, http: httpx.Client, encoding: str) -> None:
    """The adaptation: ClawTrol accepts any fresh UUID; clawq only the run id the claim handed out."""
    run = claimed(srv, http)
    tid = run["task_id"]
    before = snapshot(srv)
    resp = outcome(http, v1(tid, str(uuid.uuid4()), summary="stray"), encoding)
    assert resp.status_code == 409
    assert "fenced" in error_of(resp)
    assert snapshot(srv) == before
    assert outcome(http, v1(tid, run["run_id"], summary="mine"), encoding).status_code == 200
    after = snapshot(srv)
    other = outcome(http, v1(tid, run["run_id"], summary="another story"), encoding)
    assert other.status_code == 409  # a different outcome for a finished run is not a repeat
    assert snapshot(srv) == after


# -- ClawTrol's value casting and actions ----------------------------------------------------------------
@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("change", [
    {"version": 1}, {"version": "1"}, {"task_id": "TID"}, {"run_id": "UPPER"},
    {"needs_follow_up": ""}, {"needs_follow_up": None}, {"recommended_action": ""},
    {"ended_at": "2026-02-05T16:00:00Z", "openclaw_session_id": "s-1", "openclaw_session_key": "k-1",
     "run": {"tokens": {"input": 10, "output": 5}}, "usage": {"cost_usd": "0.02"}, "model_used": "codex"},
])
def test_task_outcome_reads_values_as_rails_does(srv: Served, http: httpx.Client, encoding: str,
                                                 change: dict[str, Any]) -> None:
    run = claimed(srv, http)
    tid, run_id = run["task_id"], run["run_id"]
    subst = {"TID": str(tid), "UPPER": run_id.upper()}
    body = {**v1(tid, run_id, summary="ok"), **{k: subst.get(v, v) if isinstance(v, str) else v
                                                for k, v in change.items()}}
    resp = outcome(http, body, encoding)
    assert resp.status_code == 200, resp.text
    assert (resp.json()["task_id"], resp.json()["status"]) == (tid, "in_review")
    assert srv.broker.get_task(tid).context[-1]["run_id"] == run_id


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize(("action", "follow", "status"), [
    ("requeue_same_task", True, "up_next"),
    ("requeue_same_task", "true", "up_next"), ("requeue_same_task", "t", "up_next"),
    ("requeue_same_task", "1", "up_next"), ("requeue_same_task", 1, "up_next"),
    ("requeue_same_task", "yes", "up_next"), ("requeue_same_task", "On", "up_next"),
    ("requeue_same_task", None, "up_next"),  # not given: the action decides
    ("requeue_same_task", False, "in_review"), ("requeue_same_task", "false", "in_review"),
    ("requeue_same_task", "f", "in_review"), ("requeue_same_task", "0", "in_review"),
    ("requeue_same_task", "no", "in_review"), ("requeue_same_task", "OFF", "in_review"),
    ("in_review", True, "in_review"), ("in_review", False, "in_review"),
    ("prompt_user", True, "in_review"), ("prompt_user", False, "in_review"),
    ("split_into_subtasks", True, "in_review"), ("split_into_subtasks", None, "in_review"),
])
def test_only_requeue_same_task_puts_the_task_back(srv: Served, http: httpx.Client, encoding: str, action: str,
                                                   follow: Any, status: str) -> None:
    run = claimed(srv, http)
    tid = run["task_id"]
    body = v1(tid, run["run_id"], recommended_action=action, next_prompt="now the docs", summary="half")
    if follow is not None:
        body["needs_follow_up"] = follow
    resp = outcome(http, body, encoding)
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == status
    task = srv.broker.get_task(tid)
    assert task.status.value == status
    assert (task.context[-1].get("next_prompt") == "now the docs") is (status == "up_next")
    if status == "up_next":
        again = http.get("/api/v1/tasks/next", headers=BEARER).json()
        assert (again["id"], again["run_count"]) == (tid, 2)
        assert "Next: now the docs" in again["description"]


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize(("change", "needle"), [
    ({"needs_follow_up": "maybe"}, "needs_follow_up: not a boolean"),
    ({"task_id": "7x"}, "task_id"),
    ({"run_id": "0" * 36}, "8-4-4-4-12"),
    ({"version": "1.0"}, "invalid version"),
])
def test_values_rails_would_not_read_are_refused(srv: Served, http: httpx.Client, encoding: str,
                                                 change: dict[str, Any], needle: str) -> None:
    run = claimed(srv, http)
    before = snapshot(srv)
    resp = outcome(http, {**v1(run["task_id"], run["run_id"]), **change}, encoding)
    assert resp.status_code == 422
    assert needle in error_of(resp)
    assert snapshot(srv) == before


@pytest.mark.parametrize(("body", "ctype", "status", "needle"), [
    (b"version=1&task_id=1&run_id=x&a[=1", "application/x-www-form-urlencoded", 422, "bad field name"),
    (b"achieved=1&achieved[]=2", "application/x-www-form-urlencoded", 422, "mixes a value, a list"),
    (b"version=%ff", "application/x-www-form-urlencoded", 422, "not UTF-8"),
    (b"{not json", "application/json", 422, "body is not valid JSON"),
    (b"[1]", "application/json", 422, "send a JSON object"),
    (b"", "application/json", 422, "send a JSON object"),
    (b"version=1", "multipart/form-data; boundary=x", 415, "unsupported Content-Type"),
    (b"version=1", "text/plain", 415, "unsupported Content-Type"),
])
def test_malformed_bodies_are_one_line_errors(srv: Served, http: httpx.Client, body: bytes, ctype: str,
                                              status: int, needle: str) -> None:
    claimed(srv, http)
    before = snapshot(srv)
    resp = http.post("/api/v1/hooks/task_outcome", content=body, headers={**HOOK, "Content-Type": ctype})
    assert resp.status_code == status
    assert needle in error_of(resp)
    assert snapshot(srv) == before


def test_a_json_body_sent_as_a_form_is_read_as_json(srv: Served, http: httpx.Client) -> None:
    """``curl -d '{…}'`` without a Content-Type header says it is a form."""
    run = claimed(srv, http)
    body = httpx.Request("POST", "/", json=v1(run["task_id"], run["run_id"])).read()
    resp = http.post("/api/v1/hooks/task_outcome", content=body,
                     headers={**HOOK, "Content-Type": "application/x-www-form-urlencoded"})
    assert resp.status_code == 200, resp.text


# -- tokens -----------------------------------------------------------------------------------------------
def test_hook_token_opens_hooks_only(srv: Served, http: httpx.Client) -> None:
    srv.broker.add("web", "t", chain="coding")
    before = snapshot(srv)
    for method, path in (("GET", "/api/v1/tasks/next"), ("GET", "/api/v1/tasks/queue_health"),
                         ("PATCH", "/api/v1/tasks/1/claim"), ("POST", "/api/v1/tasks/1/agent_complete"),
                         ("GET", "/openapi.json")):
        resp = http.request(method, path, headers=HOOK)
        assert resp.status_code == 401, path
        assert error_of(resp).startswith("missing bearer token")
    assert snapshot(srv) == before
    run = http.get("/api/v1/tasks/next", headers=BEARER).json()
    both = outcome(http, v1(run["task_id"], run["run_id"]), "json", BEARER)  # the bearer opens hooks too
    assert both.status_code == 200


# -- the skill's routes -----------------------------------------------------------------------------------
def test_next_renders_the_task_as_clawtrol_does(srv: Served, http: httpx.Client) -> None:
    first = claimed(srv, http, prompt="Fix the login form.", title="Login")
    assert (first["id"], first["name"], first["status"], first["board"]) == (first["task_id"], "Login",
                                                                             "in_progress", "web")
    assert first["description"] == "Fix the login form."
    assert (first["model"], first["provider"]) == ("codex", "openai") and first["lease_deadline"] > time.time()
    done = outcome(http, v1(first["id"], first["run_id"], recommended_action="requeue_same_task",
                            next_prompt="Now add a test.", summary="Fixed the form.", achieved=["form"]), "json")
    assert done.json()["status"] == "up_next"
    again = http.get("/api/v1/tasks/next", headers=BEARER).json()
    assert again["id"] == first["id"] and again["run_id"] != first["run_id"]
    text = again["description"]
    assert text.startswith("Fix the login form.\n\n## Run 1 (")
    for part in ("Fixed the form.", "Achieved:\n- form", "Next: Now add a test."):
        assert part in text


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_claim_confirms_the_active_run_and_is_idempotent(srv: Served, http: httpx.Client, encoding: str) -> None:
    run = claimed(srv, http)
    tid = run["task_id"]
    before = snapshot(srv)
    for _ in range(2):
        resp = send(http, "PATCH", f"/api/v1/tasks/{tid}/claim", {"session_id": "sess-1", "session_key": "k"},
                    encoding)
        assert resp.status_code == 200, resp.text
        doc = resp.json()
        assert (doc["id"], doc["status"], doc["run_id"]) == (tid, "in_progress", run["run_id"])
        assert doc["lease_deadline"] == pytest.approx(run["lease_deadline"], abs=0.001)
    assert send(http, "PATCH", f"/api/v1/tasks/{tid}/claim", None, encoding).status_code == 200  # no body
    assert snapshot(srv) == before


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_a_progress_note_extends_the_lease(srv: Served, http: httpx.Client, encoding: str) -> None:
    run = claimed(srv, http)
    tid = run["task_id"]
    lease = srv.broker.get_task(tid).lease_deadline
    time.sleep(0.05)
    resp = send(http, "PATCH", f"/api/v1/tasks/{tid}", {"task": {"activity_note": "Analyzing the codebase"}},
                encoding)
    assert resp.status_code == 200, resp.text
    assert resp.json()["run_id"] == run["run_id"]
    renewed = srv.broker.get_task(tid).lease_deadline
    assert renewed == pytest.approx(resp.json()["lease_deadline"], abs=0.001) and renewed != lease
    before = snapshot(srv)
    bad = send(http, "PATCH", f"/api/v1/tasks/{tid}", {"task": {"status": "done"}}, encoding)
    assert bad.status_code == 422
    assert "task.status" in error_of(bad)
    assert snapshot(srv) == before


@pytest.mark.parametrize(("method", "route", "body"), [
    ("PATCH", "claim", None), ("PATCH", "unclaim", None), ("PATCH", "", {"task": {"activity_note": "hi"}}),
    ("POST", "report_rate_limit", {"model_name": "codex", "error_message": "429"}),
    ("POST", "agent_complete", {"output": "done", "files": []}),
])
def test_routes_of_the_active_run_need_one(srv: Served, http: httpx.Client, method: str, route: str,
                                           body: dict[str, Any] | None) -> None:
    tid = srv.broker.add("web", "never claimed", chain="coding")
    before = snapshot(srv)
    resp = send(http, method, f"/api/v1/tasks/{tid}/{route}".rstrip("/"), body, "json")
    assert resp.status_code == 409
    assert error_of(resp) == f"task {tid} has no active run (it is up_next): take work with GET /api/v1/tasks/next"
    missing = send(http, method, f"/api/v1/tasks/424242/{route}".rstrip("/"), body, "json")
    assert (missing.status_code, error_of(missing)) == (404, "task 424242 not found")
    assert snapshot(srv) == before


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_unclaim_gives_the_run_back_without_an_attempt(srv: Served, http: httpx.Client, encoding: str) -> None:
    run = claimed(srv, http)
    tid = run["task_id"]
    resp = send(http, "PATCH", f"/api/v1/tasks/{tid}/unclaim", {}, encoding)
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert (doc["status"], doc["run_id"], doc["retry_count"]) == ("up_next", None, 0)
    task = srv.broker.get_task(tid)
    assert (task.status, task.attempts, task.run_count) == (TaskStatus.UP_NEXT, 0, 0)
    again = http.get("/api/v1/tasks/next", headers=BEARER).json()  # the head again, at once
    assert (again["id"], again["attempt"]) == (tid, 1) and again["run_id"] != run["run_id"]
    assert send(http, "PATCH", f"/api/v1/tasks/{tid}/unclaim", None, encoding).status_code == 200
    assert send(http, "PATCH", f"/api/v1/tasks/{tid}/unclaim", None, encoding).status_code == 409


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_report_rate_limit_cools_the_model_with_the_parsed_reset(srv: Served, http: httpx.Client,
                                                                 encoding: str) -> None:
    run = claimed(srv, http)
    tid, model = run["task_id"], run["model"]
    message = "You've hit your usage limit. Try again in 2 hours."
    t0 = time.time()
    resp = send(http, "POST", f"/api/v1/tasks/{tid}/report_rate_limit",
                {"model_name": model, "error_message": message, "auto_fallback": True}, encoding)
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert doc["task"]["status"] == "up_next" and doc["task"]["id"] == tid
    limit = doc["model_limit"]
    assert (limit["model"], limit["limited"]) == (model, True)
    assert limit["resets_in"] in ("1h 59m", "2h 0m")
    cooling = srv.broker.cooldowns()[model]
    assert cooling["until"] == pytest.approx(t0 + 7200, abs=5)
    assert limit["resets_at"].endswith("Z")
    task = srv.broker.get_task(tid)
    assert (task.status, task.attempts) == (TaskStatus.UP_NEXT, 0)
    fallback = http.get("/api/v1/tasks/next", headers=BEARER).json()  # the chain's next model takes it
    assert fallback["id"] == tid and fallback["model"] != model


def test_report_rate_limit_resets_at_wins_and_bad_times_are_refused(srv: Served, http: httpx.Client) -> None:
    run = claimed(srv, http)
    tid = run["task_id"]
    before = snapshot(srv)
    bad = send(http, "POST", f"/api/v1/tasks/{tid}/report_rate_limit", {"resets_at": "tomorrow-ish"}, "form")
    assert bad.status_code == 422
    assert "resets_at" in error_of(bad)
    assert snapshot(srv) == before
    when = time.time() + 1800
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
    resp = send(http, "POST", f"/api/v1/tasks/{tid}/report_rate_limit",
                {"model_name": run["model"], "error_message": "Try again in 2 hours", "resets_at": stamp}, "json")
    assert resp.status_code == 200, resp.text
    assert srv.broker.cooldowns()[run["model"]]["until"] == pytest.approx(int(when), abs=1)
    assert resp.json()["model_limit"]["resets_at"] == stamp.replace("Z", ".000Z")


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_agent_complete_sends_the_task_to_review(srv: Served, http: httpx.Client, encoding: str) -> None:
    run = claimed(srv, http)
    tid = run["task_id"]
    body = {"output": "Summary of what I did", "files": ["src/a.ts", "docs/b.md"]}
    resp = send(http, "POST", f"/api/v1/tasks/{tid}/agent_complete", body, encoding)
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert (doc["id"], doc["status"], doc["run_id"]) == (tid, "in_review", None)
    task = srv.broker.get_task(tid)
    entry = task.context[-1]
    assert (task.status, task.run_count) == (TaskStatus.IN_REVIEW, 1)
    assert (entry["run_id"], entry["summary"], entry["evidence"]) == (run["run_id"], body["output"], body["files"])
    after = snapshot(srv)
    again = send(http, "POST", f"/api/v1/tasks/{tid}/agent_complete", body, encoding)  # a retried request
    assert again.status_code == 200
    assert snapshot(srv) == after
    other = send(http, "POST", f"/api/v1/tasks/{tid}/agent_complete", {"output": "something else"}, encoding)
    assert other.status_code == 409
    assert snapshot(srv) == after


def test_agent_complete_reads_clawtrols_other_names(srv: Served, http: httpx.Client) -> None:
    run = claimed(srv, http)
    resp = send(http, "POST", f"/api/v1/tasks/{run['task_id']}/agent_complete",
                {"summary": "via summary", "output_files": "a.py, b.py\nc.py"}, "form")
    assert resp.status_code == 200, resp.text
    entry = srv.broker.get_task(run["task_id"]).context[-1]
    assert (entry["summary"], entry["evidence"]) == ("via summary", ["a.py", "b.py", "c.py"])


def test_queue_health_has_clawtrols_snapshot_keys(srv: Served, http: httpx.Client) -> None:
    run = claimed(srv, http)
    srv.broker.add("web", "waits", chain="coding")
    srv.broker.add("ops", "also waits", chain="coding")
    doc = http.get("/api/v1/tasks/queue_health", headers=BEARER).json()
    assert {"global", "boards", "models", "providers", "recent_errors"} <= set(doc)
    assert doc["active_in_progress"] == doc["global"]["in_progress"] == 1
    assert doc["queue_depth"] == 2 and doc["queue_depth_by_board"] == {"web": 1, "ops": 1}
    assert doc["inflight_by_model"] == {run["model"]: 1}
    assert doc["inflight_by_provider"] == {run["provider"]: 1}


def test_the_spec_lists_clawtrols_routes_and_fields(http: httpx.Client) -> None:
    spec = http.get("/openapi.json", headers=BEARER).json()
    paths = spec["paths"]
    for path, method in (("/api/v1/tasks/{task_id}/claim", "patch"), ("/api/v1/tasks/{task_id}/unclaim", "patch"),
                         ("/api/v1/tasks/{task_id}", "patch"),
                         ("/api/v1/tasks/{task_id}/report_rate_limit", "post"),
                         ("/api/v1/tasks/{task_id}/agent_complete", "post"), ("/api/v1/hooks/task_outcome", "post")):
        op = paths[path][method]
        assert set(op["requestBody"]["content"]) == {"application/json", "application/x-www-form-urlencoded"}, path
        assert "409" in op["responses"], path
    schemas = spec["components"]["schemas"]
    for name in ("OutcomePayloadV1", "ClaimIn", "ProgressIn", "RateLimitIn", "AgentCompleteIn", "ClawtrolTask",
                 "RateLimitOut", "NextOut", "OutcomeOut"):
        assert name in schemas, name
    assert set(schemas["OutcomeOut"]["properties"]) >= {"success", "idempotent", "task_id", "run_number", "status"}
    assert set(schemas["NextOut"]["properties"]) >= {"id", "name", "description", "status", "model", "board",
                                                     "task_id", "run_id", "lease_deadline"}
    actions = schemas["OutcomePayloadV1"]["properties"]["recommended_action"]["anyOf"][0]["enum"]
    assert set(actions) == {"in_review", "requeue_same_task", "prompt_user", "split_into_subtasks"}
    assert "queue_depth" in paths["/api/v1/tasks/queue_health"]["get"]["description"]


# -- the skill's agent loop, in bash with curl and jq ------------------------------------------------------
# The same requests, in the same order and with the same headers, as the example loop of ClawTrol's skill;
# it polls with GET /tasks/next (the skill's "auto mode" poll). Each response is echoed on its own line.
AGENT_LOOP = r"""
set -e
H_AUTH="Authorization: Bearer $CLAWTROL_TOKEN"
H_NAME="X-Agent-Name: $AGENT_NAME"
H_EMOJI="X-Agent-Emoji: $AGENT_EMOJI"
H_JSON="Content-Type: application/json"

TASK=$(curl -s "$CLAWTROL_URL/api/v1/tasks/next" -H "$H_AUTH" -H "$H_NAME" -H "$H_EMOJI")
if [ -z "$TASK" ]; then
  echo "idle"
  exit 0
fi
TASK_ID=$(echo "$TASK" | jq -r '.id')
TASK_NAME=$(echo "$TASK" | jq -r '.name')
echo "picked #$TASK_ID: $TASK_NAME"

CLAIMED=$(curl -s -X PATCH "$CLAWTROL_URL/api/v1/tasks/$TASK_ID/claim" -H "$H_AUTH" -H "$H_NAME" \
  -H "$H_EMOJI" -H "$H_JSON" -d "{\"session_id\": \"$SESSION_ID\"}")
echo "claim $(echo "$CLAIMED" | jq -c '{id, status}')"

case "$MODE" in
  rate_limit)
    MODEL=$(echo "$TASK" | jq -r '.model')
    OUT=$(curl -s -X POST "$CLAWTROL_URL/api/v1/tasks/$TASK_ID/report_rate_limit" -H "$H_AUTH" -H "$H_NAME" \
      -H "$H_EMOJI" -H "$H_JSON" \
      -d "{\"model_name\": \"$MODEL\", \"error_message\": \"Rate limit reached. Please try again in 20m0s.\"}")
    LIMIT=$(echo "$OUT" | jq -c '{status: .task.status, model: .model_limit.model, in: .model_limit.resets_in}')
    echo "rate_limit $LIMIT"
    ;;
  unclaim)
    OUT=$(curl -s -X PATCH "$CLAWTROL_URL/api/v1/tasks/$TASK_ID/unclaim" -H "$H_AUTH" -H "$H_NAME" -H "$H_EMOJI")
    echo "unclaim $(echo "$OUT" | jq -c '{id, status}')"
    ;;
  *)
    OUT=$(curl -s -X POST "$CLAWTROL_URL/api/v1/tasks/$TASK_ID/agent_complete" -H "$H_AUTH" -H "$H_NAME" \
      -H "$H_EMOJI" -H "$H_JSON" -d '{"output": "Task completed successfully", "files": []}')
    echo "complete $(echo "$OUT" | jq -c '{id, status}')"
    ;;
esac
echo "finished #$TASK_ID"
"""


def _tools() -> None:
    missing = [t for t in ("bash", "curl", "jq") if shutil.which(t) is None]
    if missing:
        if os.environ.get("CI"):  # .ci/run installs them: a skip there would hide a broken loop
            raise RuntimeError(f"CI must provide {', '.join(missing)}")
        pytest.skip(f"the skill's loop needs {', '.join(missing)} (apt-get install -y {' '.join(missing)})")


def agent_loop(srv: Served, mode: str) -> list[str]:
    _tools()
    env = {"PATH": os.environ["PATH"], "CLAWTROL_URL": srv.url, "CLAWTROL_TOKEN": TOKEN, "AGENT_NAME": "Otto",
           "AGENT_EMOJI": "🦞", "SESSION_ID": "3f1c0e9a-sess", "MODE": mode}
    proc = subprocess.run(["bash", "-c", AGENT_LOOP], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    return proc.stdout.splitlines()


def test_skill_loop_happy_path(srv: Served) -> None:
    tid = srv.broker.add("web", "Write the changelog", chain="coding", prompt="Summarise the last release.")
    assert agent_loop(srv, "complete") == [
        f"picked #{tid}: Write the changelog",
        f'claim {{"id":{tid},"status":"in_progress"}}',
        f'complete {{"id":{tid},"status":"in_review"}}',
        f"finished #{tid}",
    ]
    task = srv.broker.get_task(tid)
    assert (task.status, task.run_count, task.context[-1]["summary"]) == (
        TaskStatus.IN_REVIEW, 1, "Task completed successfully")
    assert agent_loop(srv, "complete") == ["idle"]


def test_skill_loop_with_report_rate_limit(srv: Served) -> None:
    tid = srv.broker.add("web", "Refactor the parser", chain="coding")
    lines = agent_loop(srv, "rate_limit")
    model = srv.broker.get_task(tid).running_model
    assert lines[:2] == [f"picked #{tid}: Refactor the parser", f'claim {{"id":{tid},"status":"in_progress"}}']
    assert lines[2] in (f'rate_limit {{"status":"up_next","model":"{model}","in":"{m}m"}}' for m in (19, 20))
    assert srv.broker.cooldowns()[str(model)]["remaining_s"] == pytest.approx(1200, abs=5)
    task = srv.broker.get_task(tid)
    assert (task.status, task.attempts) == (TaskStatus.UP_NEXT, 0)
    assert agent_loop(srv, "complete")[-2] == f'complete {{"id":{tid},"status":"in_review"}}'  # on the fallback
    assert srv.broker.get_task(tid).running_model != model


def test_skill_loop_with_unclaim(srv: Served) -> None:
    tid = srv.broker.add("web", "Try something", chain="coding")
    assert agent_loop(srv, "unclaim")[2] == f'unclaim {{"id":{tid},"status":"up_next"}}'
    task = srv.broker.get_task(tid)
    assert (task.status, task.attempts, task.run_count) == (TaskStatus.UP_NEXT, 0, 0)
    assert agent_loop(srv, "complete")[2] == f'complete {{"id":{tid},"status":"in_review"}}'


# -- Rails-style form parsing (no server needed) ------------------------------------------------------------
@pytest.mark.parametrize(("body", "params"), [
    (b"a=1&b=two+words&c=%E2%9C%93", {"a": "1", "b": "two words", "c": "✓"}),
    (b"a=1&a=2", {"a": "2"}),
    (b"achieved[]=x&achieved[]=y&remaining[]", {"achieved": ["x", "y"], "remaining": []}),
    (b"achieved%5B%5D=x", {"achieved": ["x"]}),
    (b"run[tokens][input]=5&run[tokens][output]=7&run[model]=codex",
     {"run": {"tokens": {"input": "5", "output": "7"}, "model": "codex"}}),
    (b"e[][type]=a&e[][seq]=1&e[][type]=b&e[][seq]=2", {"e": [{"type": "a", "seq": "1"}, {"type": "b", "seq": "2"}]}),
    (b"flag&empty=", {"flag": None, "empty": ""}),
    (b"&&a=1&", {"a": "1"}),
])
def test_parse_form(body: bytes, params: dict[str, Any]) -> None:
    from clawq.server.params import parse_form

    assert parse_form(body) == params


@pytest.mark.parametrize(("body", "needle"), [
    (b"a[=1", "bad field name"), (b"[a]=1", "bad field name"),
    (b"a[b]c=1", "bad field name"), (b"a=1&a[]=2", "mixes"), (b"a[]=1&a[b]=2", "mixes"), (b"a[b]=1&a=2", "mixes"),
    (b"a[][]=1", "list of lists"), (b"a" + b"[b]" * 20 + b"=1", "nested deeper"),
    (b"&".join(b"k%d=1" % i for i in range(1001)), "more than 1000 fields"), (b"a=%C3%28", "not UTF-8"),
    (b"a=\xff", "not UTF-8"),
])
def test_parse_form_refuses_malformed_bodies(body: bytes, needle: str) -> None:
    from clawq.server.params import BodyError, parse_form

    with pytest.raises(BodyError, match=needle) as info:
        parse_form(body)
    assert "\n" not in str(info.value) and info.value.status == 422
