from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.orm import Session, defer
from starlette.concurrency import run_in_threadpool

from app.api.deps import SessionDep, require
from app.api.errors import ApiError
from app.api.ratelimit import RATE_LIMITED, charge_lines, ingest_budget_left, ingest_rate_limited
from app.core.config import get_settings
from app.core.queue import get_celery
from app.db.models import Chip
from app.db.session import get_engine, get_sessionmaker
from app.schemas.chips import FAULT_MAP_SCHEMA, BulkResult, ChipDetail, ChipIngested, ChipPage, normalize_chip_id
from app.schemas.common import ERROR_RESPONSES, INT32_MAX, INT32_MIN
from app.services import chips as svc
from app.services import jobs as jobsvc
from app.services import plans as plansvc
from app.services.pagination import decode_cursor, encode_cursor
from app.services.profiles import all_profiles, get_profile, get_profile_cached, profile_names

router = APIRouter(prefix="/chips", tags=["chips"], responses=ERROR_RESPONSES)


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, datetime):
            v = (v if v.tzinfo else v.replace(tzinfo=UTC)).isoformat()
        out[k] = v
    return out


def _parse_json(raw: bytes) -> Any:
    if not raw.strip():
        raise ApiError(400, "empty request body: expected a JSON fault map", [{"loc": ["body"], "msg": "empty"}])
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"body is not UTF-8: {exc}", [{"loc": ["body"], "msg": "not UTF-8"}]) from None
    except json.JSONDecodeError as exc:
        msg = f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        raise ApiError(400, msg, [{"loc": ["body"], "msg": msg}]) from None
    except RecursionError:
        raise ApiError(400, "malformed JSON: nested too deeply", [{"loc": ["body"], "msg": "too deep"}]) from None


def _ingest_one(doc: Any, replace: bool) -> tuple[int, dict[str, Any]]:
    """Validate, store and run the late-chip hook: the whole request in one worker-thread hop."""
    p = svc.prepare(None, doc, profiles=get_profile_cached)  # InvalidFaultMap: a 422 (app.api.errors)
    engine = get_engine()
    # PostgreSQL, new chip (the common case): one autocommit statement, no session
    fast = svc.create_fast(engine, p) if engine.dialect.name == "postgresql" else None
    job_id: str | None = None
    new_job = False  # a late chip joins the pending job when there is one: only a new job is published
    if fast is not None:
        st, job_id, new_job = fast
    else:
        with get_sessionmaker()() as s:
            st = svc.store_one_full(s, p, replace)
            if st.status == "conflict":
                s.rollback()
                msg = (
                    f"chip {p.chip_id!r} already exists with a different fault map (revision {st.revision}); "
                    "send ?replace=true to store it as a new revision"
                )
                raise ApiError(409, msg, [{"loc": ["body", "chip_id"], "msg": msg}], current_revision=st.revision)
            if st.status in ("created", "replaced"):  # with the chip, in its transaction
                joined = plansvc.late_assignment_jobs(s, [p.chip_id])
                if joined:  # one chip: one accelerator, one job
                    job_id, new_job = joined[0]
            s.commit()
    body = svc.summary_of(p, st)
    body["status"] = st.status
    if job_id is not None:
        if new_job:
            jobsvc.enqueue(job_id, get_celery(), get_settings())
        body["assignment_job"] = job_id
    return (201 if st.status == "created" else 200), _jsonable(body)


@router.post(
    "",
    status_code=201,
    response_model=ChipIngested,
    summary="Store one chip's fault map (201 created; 200 identical re-POST or replaced; 409 different map)",
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": FAULT_MAP_SCHEMA}}}},
    responses={
        200: {"model": ChipIngested, "description": "unchanged, or replaced with ?replace=true"},
        429: RATE_LIMITED,
    },
)
async def post_chip(
    request: Request,
    replace: bool = Query(False, description="store a different map as a new revision instead of answering 409"),
    _p: Any = Depends(ingest_rate_limited),
) -> JSONResponse:
    doc = _parse_json(await request.body())
    code, body = await run_in_threadpool(_ingest_one, doc, replace)
    return JSONResponse(body, status_code=code)


def _validate_line(i: int, line: bytes, profiles: dict[str, Any]) -> svc.BulkOutcome | svc.Prepared:
    if not line.strip():
        return svc.BulkOutcome(i, "rejected", errors=[{"loc": ["line", i], "msg": "empty line"}])
    try:
        doc = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        return svc.BulkOutcome(i, "rejected", errors=[{"loc": ["line", i], "msg": f"malformed JSON: {exc}"}])
    try:
        return svc.prepare(None, doc, root="", profiles=profiles)
    except svc.InvalidFaultMap as exc:
        cid = doc.get("chip_id") if isinstance(doc, dict) and isinstance(doc.get("chip_id"), str) else None
        if cid is not None:  # echoed in the answer: unpaired surrogates as escapes, UTF-8 has no form for them
            cid = cid.encode("utf-8", "backslashreplace").decode("utf-8")
        errs = [{"loc": ["line", i, *e["loc"]], "msg": e["msg"]} for e in exc.errors]
        return svc.BulkOutcome(i, "rejected", cid, errors=errs)


def _ingest_bulk(raw: bytes, replace: bool) -> dict[str, Any]:
    settings = get_settings()
    lines = raw.split(b"\n")
    if lines and not lines[-1].strip():
        lines.pop()
    if not any(line.strip() for line in lines):
        raise ApiError(400, "empty body: expected NDJSON, one fault map per line", [{"loc": ["body"], "msg": "empty"}])
    if len(lines) > settings.max_bulk_lines:
        msg = f"{len(lines)} lines, more than the limit of {settings.max_bulk_lines} per request"
        raise ApiError(413, msg, [{"loc": ["body"], "msg": msg}])
    outcomes: dict[int, svc.BulkOutcome] = {}
    with get_sessionmaker()() as s:
        profiles = all_profiles(s)
    chunk = 1000
    # Validation (CPU) of chunk k+1 overlaps the database writes of chunk k, done in order by
    # one writer thread with its own session, so duplicates across chunks resolve as in order.
    late_jobs: dict[str, bool] = {}  # job id -> created by this request (then it publishes it)

    def add_late_job(session: Session, chunk_outcomes: list[svc.BulkOutcome]) -> None:
        fresh = [o.chip_id for o in chunk_outcomes if o.status in ("created", "replaced") and o.chip_id]
        for job_id, new in plansvc.late_assignment_jobs(session, fresh):
            late_jobs[job_id] = late_jobs.get(job_id, False) or new

    with get_sessionmaker()() as ws, ThreadPoolExecutor(1, thread_name_prefix="bulk-writer") as writer:
        pending: list[Future[list[svc.BulkOutcome]]] = []
        valid: list[tuple[int, svc.Prepared]] = []
        for i, line in enumerate(lines, start=1):
            outcome = _validate_line(i, line, profiles)
            if isinstance(outcome, svc.BulkOutcome):
                outcomes[i] = outcome
            else:
                valid.append((i, outcome))
            if len(valid) >= chunk:
                pending.append(writer.submit(svc.store_many, ws, valid, replace, chunk, add_late_job))
                valid = []
        if valid:
            pending.append(writer.submit(svc.store_many, ws, valid, replace, chunk, add_late_job))
        for fut in pending:
            for o in fut.result():
                outcomes[o.line] = o
    ordered = [outcomes[i] for i in sorted(outcomes)]
    counts = {k: 0 for k in ("created", "unchanged", "replaced", "rejected")}
    out_lines = []
    for o in ordered:
        counts[o.status] += 1
        d: dict[str, Any] = {"line": o.line, "status": o.status}
        if o.chip_id is not None:
            d["chip_id"] = o.chip_id
        if o.revision is not None:
            d["revision"] = o.revision
        if o.errors:
            d["errors"] = o.errors
        out_lines.append(d)
    result: dict[str, Any] = {"lines_total": len(lines), **counts, "lines": out_lines}
    if late_jobs:  # the pending late-chip job of each accelerator (with an executed plan) this bulk fed
        for job_id, new in late_jobs.items():
            if new:
                jobsvc.enqueue(job_id, get_celery(), settings)
        result["assignment_job"] = next(iter(late_jobs))
        result["assignment_jobs"] = list(late_jobs)
    return result


@router.post(
    "/bulk",
    response_model=BulkResult,
    responses={429: RATE_LIMITED},
    summary="Store many fault maps: NDJSON, one map per line; per-line created/unchanged/replaced/rejected",
    openapi_extra={
        "requestBody": {
            "required": True,
            # NDJSON: each item of this array is one line of the body
            "content": {
                "application/x-ndjson": {
                    "schema": {"type": "array", "items": FAULT_MAP_SCHEMA, "description": "one JSON fault map a line"}
                }
            },
        }
    },
)
async def post_chips_bulk(
    request: Request,
    replace: bool = Query(False, description="store changed maps as new revisions instead of rejecting them"),
    principal: Any = Depends(ingest_budget_left),
) -> JSONResponse:
    raw = await request.body()
    lines = raw.count(b"\n") + (0 if raw.endswith(b"\n") else 1)  # as _ingest_bulk splits them
    if lines <= get_settings().max_bulk_lines:  # beyond: a 413 for the line limit, nothing charged
        await charge_lines(request, principal, lines)
    body = await run_in_threadpool(_ingest_bulk, raw, replace)
    return JSONResponse(body)


@router.get("", response_model=ChipPage, dependencies=[Depends(require("read"))], summary="List chips")
def list_chips(
    session: SessionDep,
    lot: str | None = None,
    wafer: int | None = Query(None, ge=INT32_MIN, le=INT32_MAX),
    accelerator: str | None = Query(None, description="accelerator profile name"),
    limit: int = Query(100, ge=1, le=INT32_MAX, description="page size (at most the server's page_size_max)"),
    cursor: str | None = None,
) -> Any:
    limit = min(limit, get_settings().page_size_max)
    q = select(Chip).options(defer(Chip.fault_map)).order_by(Chip.id).limit(limit + 1)
    if lot is not None:
        q = q.where(Chip.lot == lot)
    if wafer is not None:
        q = q.where(Chip.wafer == wafer)
    if accelerator is not None:
        prof = get_profile(session, accelerator)
        if prof is None:
            return {"items": [], "next_cursor": None}
        q = q.where(Chip.accelerator_id == prof.id)
    if cursor:
        q = q.where(Chip.id > decode_cursor(cursor, int))
    rows = list(session.scalars(q))
    more = len(rows) > limit
    rows = rows[:limit]
    names = profile_names(session)
    return {
        "items": svc.chip_summaries(rows, names),
        "next_cursor": encode_cursor(rows[-1].id) if more and rows else None,
    }


@router.get(
    "/{chip_id}",
    response_model=ChipDetail,
    dependencies=[Depends(require("read"))],
    summary="One chip: current fault map and every revision",
)
def get_chip(chip_id: str, session: SessionDep) -> Any:
    chip_id = normalize_chip_id(chip_id)
    chip = session.scalar(select(Chip).where(Chip.chip_id == chip_id))
    if chip is None:
        raise ApiError(404, f"no chip {chip_id!r}", [{"loc": ["path", "chip_id"], "msg": "not found"}])
    d = svc.chip_summary(chip, profile_names(session))
    d["fault_map"] = chip.fault_map
    d["revisions"] = chip.revisions
    return d
