"""Per-API-key rate limit of the ingestion routes (POST /chips, POST /chips/bulk), with `Retry-After`.

Off unless `FAULTFLEET_INGEST_RATE_LIMIT` is set, in the `limits` library's notation
("100/second", "1000/minute;20/second": every limit must hold), per key, over a moving window.
A single POST costs 1, a bulk one per line (a 200k-line bulk is no cheaper than 200k chips); a
bulk that costs more than a limit allows in a whole window is a 413 that says to split it.
The counters live in Redis when Redis is the broker (one budget per key
across every API process and machine), else in process memory (the embedded default: each
uvicorn process keeps its own counts). If Redis cannot be reached, requests pass (ingestion must
not depend on the broker) and the failure is logged.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

from fastapi import Depends, Request
from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage, RedisStorage, Storage
from limits.strategies import MovingWindowRateLimiter
from starlette.concurrency import run_in_threadpool

from app.api.deps import Principal, _presented_key, require
from app.api.errors import ApiError
from app.core.config import Settings, get_settings
from app.core.security import hash_key
from app.schemas.common import ErrorBody

log = logging.getLogger("faultfleet.api")

RATE_LIMITED: dict[str, Any] = {
    "model": ErrorBody,
    "description": "this API key's ingestion rate limit (FAULTFLEET_INGEST_RATE_LIMIT) is spent",
    "headers": {"Retry-After": {"description": "seconds until a request may pass", "schema": {"type": "integer"}}},
}

_lock = threading.Lock()
_state: dict[str, tuple[MovingWindowRateLimiter, list[RateLimitItem]]] = {}


def _limiter(settings: Settings) -> tuple[MovingWindowRateLimiter, list[RateLimitItem]]:
    """One limiter per configuration (settings are fixed per process; tests may change them)."""
    key = f"{settings.ingest_rate_limit}|{settings.broker_url}|{settings.redis_key_prefix}"
    hit = _state.get(key)
    if hit is not None:
        return hit
    with _lock:
        if key not in _state:
            storage: Storage
            if settings.broker_url.startswith(("redis://", "rediss://")):
                prefix = f"{settings.redis_key_prefix}faultfleet-ratelimit"
                storage = RedisStorage(
                    settings.broker_url, key_prefix=prefix, socket_timeout=1.0, socket_connect_timeout=1.0
                )
            else:
                storage = MemoryStorage()
            _state[key] = (MovingWindowRateLimiter(storage), parse_many(settings.ingest_rate_limit))
        return _state[key]


def _check(settings: Settings, identity: str, cost: int = 1, charge: bool = True) -> tuple[RateLimitItem, float] | None:
    """None if a request of `cost` may pass (charged to every limit when `charge`), else the limit
    it exceeds and the seconds until it may retry."""
    limiter, items = _limiter(settings)
    try:
        # every limit tested first: a request one limit refuses is charged to none
        for item in items:
            if not limiter.test(item, "ingest", identity, cost=cost):
                return item, _wait(limiter, item, identity, cost)
        if charge:
            for item in items:
                if not limiter.hit(item, "ingest", identity, cost=cost):  # a concurrent request took the rest
                    return item, _wait(limiter, item, identity, cost)
    except Exception as exc:  # the counters' store is down: let ingestion through
        log.warning("rate limit store unreachable, request let through: %s: %s", type(exc).__name__, exc)
    return None


def _wait(limiter: MovingWindowRateLimiter, item: RateLimitItem, identity: str, cost: int) -> float:
    if cost > 1:  # the oldest entry's expiry frees one unit; a whole window frees them all
        return float(item.get_expiry())
    return max(limiter.get_window_stats(item, "ingest", identity).reset_time - time.time(), 0.0)


async def _enforce(request: Request, principal: Principal, cost: int, charge: bool) -> None:
    settings = get_settings()
    if not settings.ingest_rate_limit:
        return
    _, items = _limiter(settings)
    for item in items:
        if cost > item.amount:
            msg = (
                f"this bulk of {cost} lines costs {cost} against the ingestion rate limit of {item}, more than it "
                f"allows in a whole window: split it into bulks of at most {item.amount} lines"
            )
            raise ApiError(413, msg, [{"loc": ["body"], "msg": msg}])
    identity = hash_key(_presented_key(request) or "")[:32]
    if settings.broker_url.startswith(("redis://", "rediss://")):
        over = await run_in_threadpool(_check, settings, identity, cost, charge)
    else:
        over = _check(settings, identity, cost, charge)  # memory: no I/O
    if over is None:
        return
    item, wait = over
    retry_after = max(1, math.ceil(wait))
    what = "request" if cost == 1 else f"bulk of {cost} lines (one unit a line)"
    msg = (
        f"rate limit of {item} exceeded for API key {principal.key_prefix}... by this {what}; "
        f"retry after {retry_after} s"
    )
    errors = [{"loc": ["header", "authorization"], "msg": msg}]
    raise ApiError(429, msg, errors, headers={"Retry-After": str(retry_after)})


async def ingest_rate_limited(request: Request, principal: Principal = Depends(require("ingest"))) -> Principal:
    """Dependency of POST /chips: the `ingest` scope, then the key's rate limit (cost 1)."""
    await _enforce(request, principal, 1, charge=True)
    return principal


async def ingest_budget_left(request: Request, principal: Principal = Depends(require("ingest"))) -> Principal:
    """Dependency of POST /chips/bulk: the `ingest` scope, and a 429 before the body is read when the
    key's budget is spent already. The route charges the bulk its lines (`charge_lines`) once read."""
    await _enforce(request, principal, 1, charge=False)
    return principal


async def charge_lines(request: Request, principal: Principal, lines: int) -> None:
    """Charge a bulk of `lines` lines to the key's rate limit: 429 (or 413, larger than a whole window)."""
    await _enforce(request, principal, max(1, lines), charge=True)
