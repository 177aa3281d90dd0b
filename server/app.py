"""The HTTP API of clawq (``clawq serve``): FastAPI over :class:`broker.Broker`, with its OpenAPI spec.

Routes (``/docs`` and ``/openapi.json`` describe them):

- ``GET  /api/v1/tasks/queue_health``: the health document (``clawq health --json``);
- ``GET  /api/v1/tasks/next``: claim one task for a pull-style agent (200 the claim, 204 + skip reasons);
- ``POST /api/v1/tasks``: add a task (201);  ``GET /api/v1/tasks/{id}``: one task;
- ``POST /api/v1/tasks/{id}/heartbeat``: extend the run's lease;
- ``POST /api/v1/hooks/task_outcome``: ClawTrol's outcome payload v1 (idempotent per run);
- ``GET  /metrics``: Prometheus text (never behind the token);
- ``GET  /``: ``server/static/index.html``;  ``GET /static/…``: that directory.

Broker errors map to statuses (InputError 422, DuplicateTask 409, TaskNotFound 404, RunFenced 409,
RedisUnavailable 503, anything else 500) and every error body is ``{"error": "<one line>"}``. Requests are
validated before the broker is called, so a refused request writes nothing to Redis.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request, Security
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from clawq.broker import (
    Broker,
    Claim,
    ClawqError,
    Completion,
    DuplicateTask,
    InputError,
    NothingToClaim,
    Outcome,
    RedisUnavailable,
    RunFenced,
    Task,
    TaskNotFound,
    TaskStatus,
    redact_url,
)
from clawq.broker.broker import MAX_TASK_ID

from .auth import BearerAuth
from .metrics import CONTENT_TYPE, make_registry, render

__all__ = ["STATIC_DIR", "create_app", "is_loopback", "serve"]

#: The page and its assets (written by the dashboard, not by this module).
STATIC_DIR = Path(__file__).resolve().parent / "static"
#: Header of a 204 from ``GET /api/v1/tasks/next``: the skip reasons as a JSON object.
SKIP_REASONS_HEADER = "X-Clawq-Skip-Reasons"
API_VERSION = "1"


# -- request and response bodies -------------------------------------------------------------------------
def _canonical_uuid(value: str) -> str:
    try:
        ok = str(uuid.UUID(value)) == value
    except ValueError:
        ok = False
    if not ok:
        raise ValueError("run_id must be a UUID in canonical 36-character lowercase form")
    return value


RunId = Annotated[str, AfterValidator(_canonical_uuid)]
TaskId = Annotated[int, Field(ge=1, lt=MAX_TASK_ID, description="A positive integer below 10**14.")]


class Error(BaseModel):
    """Every error body."""

    error: str


class AddTaskIn(BaseModel):
    """A task to queue at the tail of its board: give exactly one of ``chain`` or ``model``."""

    model_config = ConfigDict(strict=True, extra="forbid")

    board: str
    title: str
    chain: str | None = None
    model: str | None = None
    prompt: str = ""
    id: TaskId | None = None

    @model_validator(mode="after")
    def _one_target(self) -> AddTaskIn:
        if (self.chain is None) == (self.model is None):
            raise ValueError("give exactly one of chain or model")
        return self


class AddTaskOut(BaseModel):
    task_id: int
    board: str
    status: TaskStatus


class ClaimOut(Claim):
    """A claim: run ``task_id`` on ``model`` as run ``run_id`` until ``lease_deadline`` (epoch s)."""

    claimed: Literal[True] = True


class HeartbeatIn(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    run_id: RunId


class HeartbeatOut(BaseModel):
    task_id: int
    run_id: str
    lease_deadline: float


TextList = list[str] | str | None


class OutcomePayloadV1(BaseModel):
    """ClawTrol's outcome payload v1 (the same rules as an agent's outcome line; unknown fields ignored)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    version: Literal["1"]
    task_id: TaskId
    run_id: RunId
    needs_follow_up: bool | None = None
    recommended_action: Literal["in_review", "requeue_same_task"] = "in_review"
    next_prompt: str | None = None
    summary: str | None = None
    achieved: TextList = None
    evidence: TextList = None
    remaining: TextList = None
    model_used: str | None = None

    @model_validator(mode="after")
    def _rules(self) -> OutcomePayloadV1:
        requeue = self.recommended_action == "requeue_same_task"
        if self.needs_follow_up is not None and self.needs_follow_up != requeue:
            raise ValueError("needs_follow_up and recommended_action disagree")
        if requeue and not (self.next_prompt or "").strip():
            raise ValueError("next_prompt is required when recommended_action is requeue_same_task")
        try:
            self.outcome()
        except ValidationError as err:
            raise ValueError(_first_error(err)) from None
        return self

    def outcome(self) -> Outcome:
        """The broker's outcome (built exactly like an agent's outcome line, so a repeat has the same digest)."""
        fields = {
            "needs_follow_up": self.recommended_action == "requeue_same_task",
            "next_prompt": self.next_prompt,
            "summary": self.summary,
            "achieved": self.achieved,
            "evidence": self.evidence,
            "remaining": self.remaining,
            "model_used": self.model_used,
        }
        return Outcome.model_validate({k: v for k, v in fields.items() if v is not None})


# -- errors -----------------------------------------------------------------------------------------------
def _one_line(text: str) -> str:
    return " ".join(text.split())


def _error(status_code: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": _one_line(message)}, status_code=status_code, headers=headers)


def _loc(loc: tuple[int | str, ...]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "path", "query", "header") and len(parts) > 1:
        parts = parts[1:]
    return ".".join(parts)


def _message(err: Any) -> str:
    msg = str(err.get("msg", "invalid"))
    return msg.removeprefix("Value error, ")


def _first_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = _loc(tuple(first["loc"]))
    return f"{where}: {_message(first)}" if where else _message(first)


def _status_for(err: ClawqError) -> int:
    if isinstance(err, TaskNotFound):
        return 404
    if isinstance(err, DuplicateTask | RunFenced):
        return 409
    if isinstance(err, InputError):
        return 422
    if isinstance(err, RedisUnavailable):
        return 503
    return 500


def _nothing(err: NothingToClaim) -> Response:
    reasons = json.dumps(err.skip_reasons, sort_keys=True, separators=(",", ":"))
    return Response(status_code=204, headers={SKIP_REASONS_HEADER: reasons})


async def _on_clawq_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ClawqError)
    if isinstance(exc, NothingToClaim):
        return _nothing(exc)
    return _error(_status_for(exc), str(exc))


def _describe(e: Any) -> str:
    """One validation error as ``<field>: <what is wrong>``."""
    loc = tuple(e.get("loc", ()))
    if e.get("type") == "json_invalid":
        detail = str((e.get("ctx") or {}).get("error", "")).strip()
        return f"body is not valid JSON{': ' + detail if detail else ''}"
    if loc == ("body",) and e.get("type") in ("missing", "model_attributes_type", "dict_type", "model_type"):
        return "body: send a JSON object (Content-Type: application/json)"
    return f"{_loc(loc)}: {_message(e)}"


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    text = "; ".join(_describe(e) for e in errors[:5])
    if len(errors) > 5:
        text += f"; and {len(errors) - 5} more"
    return _error(422, f"invalid request: {text}" if text else "invalid request")


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    # Starlette still re-raises the exception after this response, so the server logs its traceback.
    return _error(500, f"internal error: {type(exc).__name__}: {exc}")


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    message = str(exc.detail)
    if exc.status_code == 404:
        message = f"not found: {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} not allowed on {request.url.path}"
    headers = dict(exc.headers) if exc.headers else None
    return _error(exc.status_code, message, headers)


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Error, "description": text}
    for code, text in (
        (404, "No such task."),
        (409, "Duplicate task id, or the run is fenced (not the task's active run)."),
        (422, "Invalid input."),
        (503, "Redis is unreachable."),
    )
}


# -- routes -----------------------------------------------------------------------------------------------
def _broker(request: Request) -> Broker:
    found: Broker = request.app.state.broker
    return found


BrokerDep = Annotated[Broker, Depends(_broker)]
PathTaskId = Annotated[int, PathParam(ge=1, lt=MAX_TASK_ID, description="The task id.")]

api = APIRouter(prefix="/api/v1", responses={503: _ERRORS[503]})


@api.get("/tasks/queue_health", tags=["tasks"], summary="Queue health (the `clawq health --json` document)")
def queue_health(broker: BrokerDep) -> dict[str, Any]:
    return broker.health()


@api.get(
    "/tasks/next",
    tags=["agents"],
    summary="Claim the next runnable task (pull-style agents)",
    response_model=ClaimOut,
    responses={204: {"description": f"Nothing is claimable now; the {SKIP_REASONS_HEADER} header holds the "
                                    "skip reasons as a JSON object (reason -> boards)."}},
)
def next_task(broker: BrokerDep) -> Response:
    try:
        claim = broker.claim()
    except NothingToClaim as err:
        return _nothing(err)
    return JSONResponse(ClaimOut(**claim.model_dump()).model_dump(mode="json"))


@api.post("/tasks", tags=["tasks"], status_code=201, summary="Queue a task",
          responses={409: _ERRORS[409], 422: _ERRORS[422]})
def add_task(body: AddTaskIn, broker: BrokerDep) -> AddTaskOut:
    task_id = broker.add(body.board, body.title, chain=body.chain, model=body.model, prompt=body.prompt,
                         task_id=body.id)
    return AddTaskOut(task_id=task_id, board=body.board, status=TaskStatus.UP_NEXT)


@api.get("/tasks/{task_id}", tags=["tasks"], summary="One task, with its context and runs",
         responses={404: _ERRORS[404], 422: _ERRORS[422]})
def get_task(task_id: PathTaskId, broker: BrokerDep) -> Task:
    return broker.get_task(task_id)


@api.post("/tasks/{task_id}/heartbeat", tags=["agents"], summary="Extend the run's lease",
          responses={404: _ERRORS[404], 409: _ERRORS[409], 422: _ERRORS[422]})
def heartbeat(task_id: PathTaskId, body: HeartbeatIn, broker: BrokerDep) -> HeartbeatOut:
    deadline = broker.heartbeat(task_id, body.run_id)
    return HeartbeatOut(task_id=task_id, run_id=body.run_id, lease_deadline=deadline)


@api.post("/hooks/task_outcome", tags=["agents"], summary="Record a run's outcome (ClawTrol outcome payload v1)",
          responses={404: _ERRORS[404], 409: _ERRORS[409], 422: _ERRORS[422]})
def task_outcome(body: OutcomePayloadV1, broker: BrokerDep) -> Completion:
    return broker.complete(body.task_id, body.run_id, body.outcome())


class _StaticDir(StaticFiles):
    """StaticFiles that answers 404 (not a crash) while the directory does not exist yet."""

    async def check_config(self) -> None:
        return None


def _page_route(app: FastAPI, static_dir: Path) -> None:
    @app.get("/", include_in_schema=False)
    def index() -> Response:
        page = static_dir / "index.html"
        if not page.is_file():
            return _error(404, f"the dashboard page is not installed ({page} is missing)")
        # The token may be in this URL: keep it out of caches and Referer headers.
        return FileResponse(page, media_type="text/html",
                            headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})


def _metrics_route(app: FastAPI, broker: Broker) -> None:
    registry = make_registry(broker)

    @app.get("/metrics", tags=["metrics"], summary="Prometheus metrics (open even with a token)",
             response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}})
    def metrics() -> Response:
        return Response(render(registry), media_type=CONTENT_TYPE)


def create_app(broker: Broker, token: str | None = None, *, static_dir: Path | None = None) -> FastAPI:
    """The application over ``broker``; with ``token`` every route but ``/metrics`` needs it as a bearer."""
    app = FastAPI(
        title="clawq",
        version=API_VERSION,
        summary="Redis-native queue broker for boards of AI-agent tasks.",
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.broker = broker
    security = [Security(HTTPBearer(auto_error=False, description="The server's API token."))] if token else []
    app.include_router(api, dependencies=security)
    _metrics_route(app, broker)
    directory = static_dir or STATIC_DIR
    _page_route(app, directory)
    app.mount("/static", _StaticDir(directory=directory, check_dir=False), name="static")
    app.add_exception_handler(ClawqError, _on_clawq_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
    if token:
        app.add_middleware(BearerAuth, token=token)
    return app


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server on this machine (localhost, 127.0.0.0/8, ::1)."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def serve(
    redis_url: str,
    namespace: str,
    host: str = "127.0.0.1",
    port: int = 8765,
    token: str | None = None,
    *,
    say: Callable[[str], None] = print,
) -> None:
    """Run the HTTP server until interrupted; a non-loopback ``host`` needs a token.

    The port is taken first, so a port in use is one clear error (ClawqError, exit 1) before anything else.
    While Redis does not answer, ``say`` is told once and the server waits for it; then ``say`` gets the
    address it listens on.
    """
    if not is_loopback(host) and not token:
        raise InputError(
            f"refusing to listen on {host}: a non-loopback address needs an API token (set CLAWQ_API_TOKEN)"
        )
    if not 0 <= port <= 65535:
        raise InputError(f"bad port {port}: 0-65535")
    import uvicorn

    from clawq.broker.waiting import connect_when_ready

    sock = _listen(host, port)
    try:
        broker = connect_when_ready(redis_url, namespace, on_wait=lambda err: say(f"clawq serve: {err}; waiting "
                                                                                 "for Redis to answer"))
        assert broker is not None  # no stop event: it waits until Redis answers
        bound = sock.getsockname()
        say(f"clawq serve: listening on http://{_url_host(host)}:{bound[1]}/ (namespace {namespace}, "
            f"Redis {redact_url(redis_url)})")
        try:
            config = uvicorn.Config(create_app(broker, token), log_level="warning")
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            broker.close()
    finally:
        sock.close()


def _url_host(host: str) -> str:
    bare = host.strip("[]")
    return f"[{bare}]" if ":" in bare else bare


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, or ClawqError (exit 1) in one line: in use, not permitted…"""
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    try:
        sock = socket.create_server((bare, port), family=family, backlog=2048)
    except OSError as err:
        why = os.strerror(err.errno) if err.errno else str(err)
        raise ClawqError(f"cannot listen on {_url_host(host)}:{port}: {why}") from None
    sock.set_inheritable(True)
    return sock
