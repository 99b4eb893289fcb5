from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from app.core.queue import check_broker
from app.db.session import get_engine

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _check_db() -> None:
    with get_engine().connect() as conn:
        conn.execute(text("SELECT 1"))


@router.get("/readyz", summary="Database and broker are reachable", responses={503: {"description": "not ready"}})
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
    if not ok:
        body["detail"] = "; ".join(f"{k} {v}" for k, v in checks.items() if v != "ok")
        body["errors"] = [{"loc": [k], "msg": v} for k, v in checks.items() if v != "ok"]
    return JSONResponse(body, status_code=200 if ok else 503)
