"""The HTTP API of clawq (``clawq serve``): FastAPI over :class:`broker.Broker`, with its OpenAPI spec.

Routes (``/docs`` and ``/openapi.json`` describe them):

- ``GET  /api/v1/tasks/queue_health``: the health document (``clawq health --json``);
- ``GET  /api/v1/tasks/next``: claim one task for a pull-style agent (200 the claim with the task as ClawTrol
  renders it, 204 + skip reasons);
- ``POST /api/v1/tasks``: add a task (201);  ``GET /api/v1/tasks/{id}``: one task;
- ``POST /api/v1/tasks/{id}/heartbeat``: extend the run's lease;
- ClawTrol's agent routes, on the task's active run (409 when it has none): ``PATCH /api/v1/tasks/{id}/claim``,
  ``PATCH /api/v1/tasks/{id}`` (a progress note: extends the lease),
  ``PATCH /api/v1/tasks/{id}/unclaim``, ``POST /api/v1/tasks/{id}/report_rate_limit``,
  ``POST /api/v1/tasks/{id}/agent_complete`` (:mod:`server.clawtrol`);
- ``POST /api/v1/hooks/task_outcome``: ClawTrol's outcome payload v1 (idempotent per run);
- ``GET  /metrics``: Prometheus text (never behind the token);
- ``GET  /``: ``server/static/index.html``;  ``GET /static/…``: that directory.

ClawTrol's routes take their body as JSON or as a Rails-style form (:mod:`server.params`).
Broker errors map to statuses (InputError 422, DuplicateTask 409, TaskNotFound 404, RunFenced 409,
NoActiveRun 409, RedisUnavailable 503, anything else 500) and every error body is ``{"error": "<one line>"}``.
Requests are validated before the broker is called, so a refused request writes nothing to Redis.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

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
from clawq.broker.checks import MAX_TASK_ID, run_id_problem
from clawq.workers.clawtrol import OutcomeV1

from . import clawtrol
from .auth import BearerAuth
from .clawtrol import AgentCompleteIn, ClaimIn, ClawtrolTask, NoActiveRun, ProgressIn, RateLimitIn, RateLimitOut
from .metrics import CONTENT_TYPE, make_registry, render
from .params import FORM, BodyError, parse_body

__all__ = ["STATIC_DIR", "create_app", "is_loopback", "serve"]

#: The page and its assets (written by the dashboard, not by this module).
STATIC_DIR = Path(__file__).resolve().parent / "static"
#: Header of a 204 from ``GET /api/v1/tasks/next``: the skip reasons as a JSON object.
SKIP_REASONS_HEADER = "X-Clawq-Skip-Reasons"
API_VERSION = "1"


# -- request and response bodies -------------------------------------------------------------------------
def _canonical_uuid(value: str) -> str:
    if run_id_problem(value) is not None:
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
    not_before: str | None = None  #: ISO 8601 (or HH:MM): the task waits as `scheduled` until then
    night_only: bool = False  #: the task may only start inside the night window

    @model_validator(mode="after")
    def _one_target(self) -> AddTaskIn:
        if (self.chain is None) == (self.model is None):
            raise ValueError("give exactly one of chain or model")
        return self


class AddTaskOut(BaseModel):
    task_id: int
    board: str
    status: TaskStatus
    due_at: float | None = None  #: epoch seconds, while scheduled


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


class NextOut(ClaimOut):
    """A claim, with the task as ClawTrol renders it (``id``, ``name``, ``description``, ``status``; ``model``
    and ``board`` are the claim's)."""

    id: int
    name: str
    description: str
    status: TaskStatus


class OutcomeOut(Completion):
    """What the outcome did: ClawTrol's fields (``success``, ``idempotent``, ``run_number``) and clawq's."""

    success: Literal[True] = True
    idempotent: bool = Field(description="The same outcome had already been recorded: nothing changed.")
    run_number: int = Field(description="The number of the run the outcome is for.")


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


def _status_for(err: ClawqError) -> int:
    if isinstance(err, TaskNotFound):
        return 404
    if isinstance(err, DuplicateTask | RunFenced | NoActiveRun):
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


async def _on_body_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BodyError)
    return _error(exc.status, f"invalid request: {exc}")


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
        (409, "Duplicate task id, or the run is fenced (not the task's active run), or the task has no active run."),
        (415, "A body that is neither JSON nor application/x-www-form-urlencoded."),
        (422, "Invalid input."),
        (503, "Redis is unreachable."),
    )
}


# -- routes -----------------------------------------------------------------------------------------------
def _broker(request: Request) -> Broker:
    found: Broker = request.app.state.broker
    return found


async def _params(request: Request) -> dict[str, Any]:
    """The body as Rails params: a JSON object or a form (:mod:`server.params`); none is an empty object."""
    return parse_body(await request.body(), request.headers.get("content-type"))


BodyModel = TypeVar("BodyModel", bound=BaseModel)


def _validate(model: type[BodyModel], params: dict[str, Any]) -> BodyModel:
    """``params`` as ``model``; a refusal is the same one-line 422 as a JSON body's."""
    try:
        return model.model_validate(params)
    except ValidationError as err:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in err.errors()]) from None


#: Models whose schema the spec lists although no route declares them as a body (their routes read params).
_BODY_MODELS: tuple[type[BaseModel], ...] = (OutcomeV1, ClaimIn, ProgressIn, RateLimitIn, AgentCompleteIn)


def _body(model: type[BaseModel], *, required: bool = True) -> dict[str, Any]:
    """The OpenAPI request body of a route that reads params: ``model`` as JSON or as a form."""
    ref = {"$ref": f"#/components/schemas/{_schema_name(model)}"}
    return {"requestBody": {"required": required, "content": {"application/json": {"schema": ref},
                                                               FORM: {"schema": ref}}}}


def _schema_name(model: type[BaseModel]) -> str:
    return str(model.model_config.get("title") or model.__name__)


async def _required_params(request: Request) -> dict[str, Any]:
    """As :func:`_params`, for a route whose body is required."""
    params = await _params(request)
    if not params:
        raise BodyError(f"body: send a JSON object (Content-Type: application/json) or a form ({FORM})")
    return params


BrokerDep = Annotated[Broker, Depends(_broker)]
Params = Annotated[dict[str, Any], Depends(_params)]
RequiredParams = Annotated[dict[str, Any], Depends(_required_params)]
PathTaskId = Annotated[int, PathParam(ge=1, lt=MAX_TASK_ID, description="The task id.")]

api = APIRouter(prefix="/api/v1", responses={503: _ERRORS[503]})


@api.get("/tasks/queue_health", tags=["tasks"],
         summary="Queue health (the `clawq health --json` document, with ClawTrol's snapshot keys beside)",
         description="clawq's keys (`global`, `boards`, `models`, `providers`, `recent_errors`) and ClawTrol's: "
                     "`now`, `in_night_window`, `max_concurrent`, `active_in_progress`, `available_slots`, "
                     "`queue_depth`, `queue_depth_by_board`, `inflight_by_model`, `inflight_by_provider`, "
                     "`model_limits_active`.")
def queue_health(broker: BrokerDep) -> dict[str, Any]:
    doc = broker.health()
    return {**doc, **clawtrol.queue_snapshot(doc, broker.now())}


@api.get(
    "/tasks/next",
    tags=["agents"],
    summary="Claim the next runnable task (pull-style agents)",
    response_model=NextOut,
    responses={204: {"description": f"Nothing is claimable now; the {SKIP_REASONS_HEADER} header holds the "
                                    "skip reasons as a JSON object (reason -> boards)."}},
)
def next_task(broker: BrokerDep) -> Response:
    try:
        claim = broker.claim()
    except NothingToClaim as err:
        return _nothing(err)
    task = broker.get_task(claim.task_id)
    out = NextOut(**claim.model_dump(), id=task.task_id, name=task.title, description=clawtrol.describe(task),
                  status=task.status)
    return JSONResponse(out.model_dump(mode="json"))


@api.post("/tasks", tags=["tasks"], status_code=201, summary="Queue a task",
          responses={409: _ERRORS[409], 422: _ERRORS[422]})
def add_task(body: AddTaskIn, broker: BrokerDep) -> AddTaskOut:
    at = broker.parse_time(body.not_before) if body.not_before is not None else None
    done = broker.add_task(body.board, body.title, chain=body.chain, model=body.model, prompt=body.prompt,
                           task_id=body.id, not_before=at, night_only=body.night_only)
    return AddTaskOut(task_id=done.task_id, board=body.board, status=done.status, due_at=done.due_at)


@api.get("/tasks/{task_id}", tags=["tasks"], summary="One task, with its context and runs",
         responses={404: _ERRORS[404], 422: _ERRORS[422]})
def get_task(task_id: PathTaskId, broker: BrokerDep) -> Task:
    return broker.get_task(task_id)


@api.post("/tasks/{task_id}/heartbeat", tags=["agents"], summary="Extend the run's lease",
          responses={404: _ERRORS[404], 409: _ERRORS[409], 422: _ERRORS[422]})
def heartbeat(task_id: PathTaskId, body: HeartbeatIn, broker: BrokerDep) -> HeartbeatOut:
    deadline = broker.heartbeat(task_id, body.run_id)
    return HeartbeatOut(task_id=task_id, run_id=body.run_id, lease_deadline=deadline)


_ACTIVE: dict[int | str, dict[str, Any]] = {404: _ERRORS[404], 409: _ERRORS[409], 415: _ERRORS[415], 422: _ERRORS[422]}


@api.patch("/tasks/{task_id}/claim", tags=["agents"], summary="Confirm the active run (ClawTrol's claim)",
           description="Confirms the run that `GET /tasks/next` handed out and answers the task; writes nothing, "
                       "so it is idempotent. The body (`session_id`, `session_key`) is optional and not stored.",
           responses=_ACTIVE, openapi_extra=_body(ClaimIn, required=False))
def claim_task(task_id: PathTaskId, params: Params, broker: BrokerDep) -> ClawtrolTask:
    _validate(ClaimIn, params)
    task, _ = clawtrol.active_task(broker, task_id)
    return clawtrol.render(task)


@api.patch("/tasks/{task_id}", tags=["agents"], summary="A progress note on the active run: extends its lease",
           description="ClawTrol's progress update (`{\"task\": {\"activity_note\": \"…\"}}`): the note is "
                       "accepted, not stored, and the active run's lease is extended as by a heartbeat. Other task "
                       "fields cannot be changed here.",
           responses=_ACTIVE, openapi_extra=_body(ProgressIn, required=False))
def progress(task_id: PathTaskId, params: Params, broker: BrokerDep) -> ClawtrolTask:
    _validate(ProgressIn, params)
    task, run_id = clawtrol.active_task(broker, task_id)
    deadline = broker.heartbeat(task_id, run_id)
    return clawtrol.render(task).model_copy(update={"lease_deadline": deadline})


@api.patch("/tasks/{task_id}/unclaim", tags=["agents"], summary="Give the active run back (ClawTrol's unclaim)",
           description="The task is its board's head again at once; no attempt is used.",
           responses=_ACTIVE, openapi_extra=_body(ClaimIn, required=False))
def unclaim_task(task_id: PathTaskId, params: Params, broker: BrokerDep) -> ClawtrolTask:
    _validate(ClaimIn, params)
    _, run_id = clawtrol.active_task(broker, task_id)
    broker.release(task_id, run_id, "released", "unclaimed by the agent")
    return clawtrol.render(broker.get_task(task_id))


@api.post("/tasks/{task_id}/report_rate_limit", tags=["agents"], summary="The active run hit a rate limit",
          description="Cools the run's model until `resets_at`, else until the reset parsed from `error_message`, "
                      "else for the configured rate-limit cooldown; the task is its board's head again and no "
                      "attempt is used. The next claim falls back along the task's chain.",
          responses=_ACTIVE, openapi_extra=_body(RateLimitIn, required=False))
def report_rate_limit(task_id: PathTaskId, params: Params, broker: BrokerDep) -> RateLimitOut:
    body = _validate(RateLimitIn, params)
    _, run_id = clawtrol.active_task(broker, task_id)
    model, until = broker.rate_limited(task_id, run_id, message=body.error_message or "Rate limit exceeded",
                                       reset_at=body.resets_at)
    left = until - broker.now()
    limit = clawtrol.ModelLimit(model=model, limited=left > 0, resets_at=clawtrol.iso(until),
                                resets_in=clawtrol.resets_in(left))
    return RateLimitOut(task=clawtrol.render(broker.get_task(task_id)), model_limit=limit)


@api.post("/tasks/{task_id}/agent_complete", tags=["agents"], summary="The active run is done: to in_review",
          description="Records the active run's outcome: no follow-up, `output` as its summary and `files` as its "
                      "evidence. Repeating the same completion answers 200 and changes nothing.",
          responses=_ACTIVE, openapi_extra=_body(AgentCompleteIn, required=False))
def agent_complete(task_id: PathTaskId, params: Params, broker: BrokerDep) -> ClawtrolTask:
    outcome = _validate(AgentCompleteIn, params).outcome()
    task = broker.get_task(task_id)
    if task.status is TaskStatus.IN_PROGRESS and task.run_id:
        broker.complete(task_id, task.run_id, outcome)
    elif not _repeated(broker, task, outcome):
        raise NoActiveRun(task)
    return clawtrol.render(broker.get_task(task_id))


def _repeated(broker: Broker, task: Task, outcome: Outcome) -> bool:
    """Whether ``outcome`` is exactly the one recorded for the task's last run (then nothing changes)."""
    last = task.context[-1].get("run_id") if task.context else None
    if not isinstance(last, str):
        return False
    try:
        return broker.complete(task.task_id, last, outcome).repeated
    except RunFenced:
        return False


@api.post("/hooks/task_outcome", tags=["agents"], summary="Record a run's outcome (ClawTrol outcome payload v1)",
          description="The body is JSON or a Rails-style form (`achieved[]=a&achieved[]=b`). Only the run id the "
                      "claim handed out is accepted (fencing); the same outcome again answers 200 with "
                      "`idempotent: true` and changes nothing.",
          responses=_ACTIVE, openapi_extra=_body(OutcomeV1))
def task_outcome(params: RequiredParams, broker: BrokerDep) -> OutcomeOut:
    body = _validate(OutcomeV1, params)
    done = broker.complete(body.task_id, body.run_id, body.outcome())
    return OutcomeOut(**done.model_dump(), idempotent=done.repeated, run_number=done.run_count)


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
    app.add_exception_handler(BodyError, _on_body_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
    if token:
        app.add_middleware(BearerAuth, token=token)
    _list_body_models(app)
    return app


def _list_body_models(app: FastAPI) -> None:
    """Add the schemas of :data:`_BODY_MODELS` to the generated spec (their routes refer to them)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = generate()
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            for model in _BODY_MODELS:
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(schema.pop("$defs", {}))
                schemas[_schema_name(model)] = schema
        return app.openapi_schema or generate()

    app.openapi = openapi  # type: ignore[method-assign]


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
        broker.on_wipe = lambda err: say(f"clawq serve: NAMESPACE WIPED: {err}")
        evicts = broker.memory().warning()
        if evicts:
            say(f"clawq serve: WARNING {evicts}")
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
