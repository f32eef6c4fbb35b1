"""The HTTP API of the cluster service (FastAPI): submit, list, logs, cancel, events, shutdown.

Every route needs ``Authorization: Bearer <token>`` with the token written at
``distml cluster up`` (401 otherwise). Every failure is a JSON
``{"error": "..."}`` with one line: 400 for a spec that is not YAML, 422 for
a spec or request that does not validate (unknown fields, more slots than the
cluster has, a bad distml config), 404 for an unknown job, 409 for a request
the job's state forbids. Job references are ids or names.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from typing import Any

import pydantic
from fastapi import Body, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from distml.cluster.service.executor import log_tail
from distml.cluster.service.jobspec import SpecError, SpecSyntaxError, parse_spec_text, resolve_spec
from distml.cluster.service.scheduler_loop import JobConflict, JobNotFound, Scheduler
from distml.errors import UserError


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class SubmitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: The job spec file's text (YAML).
    spec: str
    #: Folder that a relative ``config:`` path is resolved against (the spec's folder).
    base_dir: str | None = None
    #: Working directory of the job's processes (relative paths in its config).
    workdir: str | None = None
    slots: int | None = Field(None, ge=1)
    priority: int | None = None


class MigrateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    slots: list[int] | None = None


def _status_of(exc: UserError) -> int:
    if isinstance(exc, SpecSyntaxError):
        return 400
    if isinstance(exc, SpecError):
        return 422
    if isinstance(exc, JobNotFound):
        return 404
    if isinstance(exc, JobConflict):
        return 409
    return 400


def _one_line(exc: pydantic.ValidationError | RequestValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if p != "body")
    if err["type"] == "extra_forbidden":
        return f"unknown field '{loc}' in the request"
    return f"invalid request field '{loc}': {err['msg']}"


def create_app(
    scheduler: Scheduler, token: str, on_shutdown: Callable[[], None] | None = None
) -> FastAPI:
    """The service app over a started :class:`Scheduler`."""

    def authorize(request: Request) -> None:
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not value:
            raise ApiError(401, "missing bearer token; send 'Authorization: Bearer <token>'")
        if not hmac.compare_digest(value.strip().encode(), token.encode()):
            raise ApiError(401, "invalid bearer token; use the token from the state dir")

    app = FastAPI(title="distml cluster", dependencies=[Depends(authorize)])

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)

    @app.exception_handler(UserError)
    async def _user_error(request: Request, exc: UserError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=_status_of(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": _one_line(exc)}, status_code=422)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not bad input: answer in the same one-line form and keep serving.
        text = str(exc).splitlines()[0] if str(exc) else ""
        return JSONResponse(
            {"error": f"internal error: {type(exc).__name__}: {text}"}, status_code=500
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.get("/v1/cluster")
    def cluster() -> dict[str, Any]:
        return {**scheduler.info(), "pid": os.getpid()}

    @app.post("/v1/jobs", status_code=201)
    def submit(body: Any = Body(...)) -> dict[str, Any]:
        try:
            req = SubmitRequest.model_validate(body)
        except pydantic.ValidationError as exc:
            raise ApiError(422, _one_line(exc)) from None
        spec = parse_spec_text(req.spec)
        base = req.base_dir or req.workdir or os.getcwd()
        resolved = resolve_spec(
            spec,
            base_dir=base,
            workdir=req.workdir or base,
            cluster_slots=scheduler.num_slots,
            slots=req.slots,
            priority=req.priority,
        )
        return scheduler.submit(resolved).to_dict()

    @app.get("/v1/jobs")
    def jobs() -> list[dict[str, Any]]:
        return [rec.to_dict() for rec in scheduler.store.list_jobs()]

    @app.get("/v1/jobs/{ref}")
    def job(ref: str) -> dict[str, Any]:
        rec = scheduler.resolve(ref)
        return {**rec.to_dict(), "allocations": scheduler.store.allocations(rec.id)}

    @app.get("/v1/jobs/{ref}/logs")
    def logs(ref: str, tail: int = 200) -> dict[str, Any]:
        rec = scheduler.resolve(ref)
        return {"job": rec.id, "log": log_tail(scheduler.files(rec.id), max(1, tail))}

    @app.post("/v1/jobs/{ref}/cancel")
    def cancel(ref: str) -> dict[str, Any]:
        return scheduler.cancel(scheduler.resolve(ref).id).to_dict()

    @app.post("/v1/jobs/{ref}/migrate")
    def migrate(ref: str, body: MigrateRequest | None = None) -> dict[str, Any]:
        slots = body.slots if body is not None else None
        return scheduler.migrate(scheduler.resolve(ref).id, slots).to_dict()

    @app.get("/v1/events")
    def events(job: str | None = None, since: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        job_id = scheduler.resolve(job).id if job is not None else None
        return scheduler.store.events(job_id, since, max(1, min(limit, 10000)))

    @app.post("/v1/shutdown")
    def shutdown() -> dict[str, Any]:
        if on_shutdown is not None:
            on_shutdown()
        return {"stopping": True}

    return app
