"""Dependencies: database sessions and API-key auth with scopes."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Path, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.api.errors import ApiError
from app.core.config import Settings, get_settings
from app.core.security import allows, hash_key, key_prefix, parse_scopes
from app.db.models import ApiKey
from app.db.session import get_sessionmaker
from app.schemas.common import INT32_MAX

log = logging.getLogger("faultfleet.api")
# a database id in a path, e.g. /plans/{plan_id} (schemas and services stay free of FastAPI)
IdPath = Annotated[int, Path(ge=1, le=INT32_MAX, description="database id")]


def get_db() -> Iterator[Session]:
    session = get_sessionmaker()()
    try:
        yield session
    finally:
        # Closing rolls back on the connection; when the database went away mid-request that
        # fails too (the pool has invalidated the connection already). The request's own error,
        # if any, is what counts: the answer is already on its way.
        try:
            session.close()
        except DBAPIError:
            log.info("closing a session on a lost database connection failed", exc_info=True)


SessionDep = Annotated[Session, Depends(get_db)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


@dataclass(frozen=True)
class Principal:
    key_prefix: str
    scopes: frozenset[str]


_cache: dict[str, tuple[Principal, float]] = {}
_cache_lock = threading.Lock()


def _lookup(key: str, settings: Settings) -> Principal | None:
    h = hash_key(key)
    now = time.monotonic()
    hit = _cache.get(h)
    if hit is not None and hit[1] > now:
        return hit[0]
    principal: Principal | None = None
    for entry in settings.api_keys:  # keys given by environment ('scope[,scope]:key')
        scopes, sep, plain = entry.partition(":")
        if sep and plain == key:
            principal = Principal("env", parse_scopes(scopes))
            break
    if principal is None:
        with get_sessionmaker()() as s:
            row = s.execute(
                select(ApiKey.scopes, ApiKey.prefix).where(ApiKey.key_hash == h, ApiKey.revoked_at.is_(None))
            ).one_or_none()
        if row is None:
            return None
        principal = Principal(row.prefix, parse_scopes(row.scopes))
    with _cache_lock:
        if len(_cache) > 10_000:
            _cache.clear()
        _cache[h] = (principal, now + settings.auth_cache_s)
    return principal


def _presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return request.headers.get("x-api-key") or None


def require(scope: str) -> Callable[[Request], Awaitable[Principal]]:
    """Dependency factory: the request must carry an API key granting `scope` (admin grants all)."""

    async def dep(request: Request) -> Principal:
        key = _presented_key(request)
        challenge = {"WWW-Authenticate": 'Bearer realm="faultfleet"'}
        if not key:
            msg = "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key'"
            raise ApiError(401, msg, [{"loc": ["header", "authorization"], "msg": msg}], headers=challenge)
        settings = get_settings()
        hit = _cache.get(hash_key(key))
        if hit is not None and hit[1] > time.monotonic():
            principal: Principal | None = hit[0]
        else:
            principal = await run_in_threadpool(_lookup, key, settings)
        if principal is None:
            msg = f"unknown or revoked API key {key_prefix(key)}..."
            raise ApiError(401, msg, [{"loc": ["header", "authorization"], "msg": msg}], headers=challenge)
        if not allows(principal.scopes, scope):
            msg = f"this API key lacks scope {scope!r} (it has: {sorted(principal.scopes)})"
            raise ApiError(403, msg, [{"loc": ["header", "authorization"], "msg": msg}])
        return principal

    dep.__name__ = f"require_{scope}"
    setattr(dep, "required_scope", scope)  # read by document_scopes  # noqa: B010
    return dep


# How the OpenAPI document states authentication: either header, and the scope per operation.
SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "an API key: `Authorization: Bearer <key>`"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "the same key, another header"},
}


def _required_scope(dependant: Dependant) -> str | None:
    for d in dependant.dependencies:
        scope = getattr(d.call, "required_scope", None) or _required_scope(d)
        if scope:
            return str(scope)
    return None


def document_scopes(router: APIRouter) -> APIRouter:
    """Give each route of `router` that requires a scope `security` and `x-required-scope` in OpenAPI."""
    for route in router.routes:
        if isinstance(route, APIRoute) and (scope := _required_scope(route.dependant)):
            extra = {"security": [{"bearer": []}, {"apiKey": []}], "x-required-scope": scope}
            route.openapi_extra = {**(route.openapi_extra or {}), **extra}
    return router


def document_security_schemes(app: FastAPI) -> None:
    """Add the security schemes that `document_scopes` refers to to the app's OpenAPI document."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            build().setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
        assert app.openapi_schema is not None
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
