"""One JSON error shape for every 4xx/5xx: ``{"detail": str, "errors": [{"loc": [...], "msg": str}]}``."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.services.errors import Conflict, DomainError, Invalid, NotFound

log = logging.getLogger("faultfleet.api")


class ApiError(Exception):
    """An error answered as JSON with a status code (raised by routes; services raise `DomainError`)."""

    def __init__(
        self,
        status_code: int,
        detail: str,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.errors = errors if errors is not None else []
        self.headers = headers
        self.extra = extra


# The one place where a domain error becomes a status code.
DOMAIN_STATUS: dict[type[DomainError], int] = {NotFound: 404, Conflict: 409, Invalid: 422}


def domain_status(exc: DomainError) -> int:
    """The status code of a domain error: its kind's (the nearest base class in `DOMAIN_STATUS`)."""
    for kind in type(exc).__mro__:
        if kind in DOMAIN_STATUS:
            return DOMAIN_STATUS[kind]
    return 400


def error_body(detail: str, errors: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    return {"detail": detail, "errors": errors or [], **extra}


def describe_database_error(exc: BaseException, retry_after_s: int) -> tuple[str, int]:
    """A 503's message naming the database and what went wrong, and its Retry-After in seconds."""
    orig = getattr(exc, "orig", None) or exc
    first = (str(orig).strip().splitlines() or [type(orig).__name__])[0][:300]
    if "database is locked" in first or "database table is locked" in first:
        return f"database busy: the SQLite database is locked by another writer ({first}); retry shortly", 1
    if isinstance(exc, PoolTimeoutError):
        return f"database busy: no free database connection ({first}); retry shortly", 1
    return f"database unavailable: {first}", retry_after_s


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_req: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(
            error_body(exc.detail, exc.errors, **exc.extra), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(DomainError)
    async def _domain_error(_req: Request, exc: DomainError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.errors, **exc.extra), status_code=domain_status(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return JSONResponse(error_body(detail), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_req: Request, exc: RequestValidationError) -> JSONResponse:
        errors = []
        for e in exc.errors():
            item: dict[str, Any] = {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", ""))}
            if e.get("type"):
                item["type"] = e["type"]
            errors.append(item)
        status = 400 if any(e.get("type") == "json_invalid" for e in exc.errors()) else 422
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        detail = f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
        return JSONResponse(error_body(detail, errors), status_code=status)

    @app.exception_handler(DataError)
    async def _data_error(req: Request, exc: DataError) -> JSONResponse:
        # The database refused a value that came from the request (e.g. a NUL byte in a
        # PostgreSQL text field): bad input, so a 4xx, never a 500.
        msg = str(getattr(exc, "orig", None) or exc).splitlines()[0][:500]
        log.info("data error on %s %s: %s", req.method, req.url.path, msg)
        return JSONResponse(error_body(f"invalid value: {msg}", [{"loc": ["request"], "msg": msg}]), status_code=422)

    async def _database_unavailable(req: Request, exc: Exception) -> JSONResponse:
        # The database is down, unreachable, or (SQLite) locked by another writer past the busy
        # timeout: a dependency's trouble, not the request's, so 503 + Retry-After. Nothing is
        # cached about the failure: the next request connects afresh and succeeds once it is back.
        from app.core.config import get_settings

        detail, retry_after = describe_database_error(exc, get_settings().db_retry_after_s)
        log.warning("database unavailable on %s %s: %s", req.method, req.url.path, detail)
        return JSONResponse(
            error_body(detail, [{"loc": ["database"], "msg": detail}]),
            status_code=503,
            headers={"Retry-After": str(retry_after)},
        )

    for exc_type in (OperationalError, InterfaceError, DisconnectionError, PoolTimeoutError):
        app.add_exception_handler(exc_type, _database_unavailable)

    @app.exception_handler(Exception)
    async def _unexpected(req: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", req.method, req.url.path)
        return JSONResponse(error_body("internal server error"), status_code=500)
