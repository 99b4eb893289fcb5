from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from app.core.config import get_settings
from app.core.queue import check_broker
from app.db.session import get_engine
from app.services.jobs import worker_health

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _check_db() -> None:
    with get_engine().connect() as conn:
        conn.execute(text("SELECT 1"))


@router.get(
    "/readyz",
    summary="Ready to take requests and queue jobs: database and broker reachable (503 if not); "
    "also reports whether any worker heart-beat recently",
    responses={503: {"description": "not ready"}},
)
async def readyz() -> JSONResponse:
    checks: dict[str, Any] = {}
    for name, fn in (("database", _check_db), ("broker", check_broker)):
        try:
            await run_in_threadpool(fn)
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"unreachable: {type(exc).__name__}: {exc}"[:500]
    ok = all(v == "ok" for v in checks.values())
    body: dict[str, Any] = {"status": "ready" if ok else "not ready", "checks": checks}
    # Workers do not gate readiness (the API ingests and queues without them), but an operator
    # must see when none is running: jobs would then wait.
    if checks["database"] == "ok":
        try:
            body["workers"] = await run_in_threadpool(worker_health, get_engine(), get_settings())
        except Exception as exc:
            body["workers"] = {"status": f"unknown: {type(exc).__name__}: {exc}"[:500]}
    if not ok:
        body["detail"] = "; ".join(f"{k} {v}" for k, v in checks.items() if v != "ok")
        body["errors"] = [{"loc": [k], "msg": v} for k, v in checks.items() if v != "ok"]
    return JSONResponse(body, status_code=200 if ok else 503)
