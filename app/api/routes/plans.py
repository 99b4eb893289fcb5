"""Plans: build (resilience map, screening, grouping) and execute (retrain, verify, replan)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response
from sqlalchemy import select

from app.api.deps import IdPath, Principal, SessionDep, SettingsDep, require
from app.api.errors import ApiError
from app.core.queue import get_celery, require_broker
from app.db.models import Job
from app.schemas.common import ERROR_RESPONSES
from app.schemas.jobs import JobOut
from app.schemas.plans import PlanAccepted, PlanIn, PlanOut, ResilienceMapOut
from app.services import jobs as jobsvc
from app.services import plans as svc
from app.services.pagination import decode_cursor

router = APIRouter(tags=["plans"], responses=ERROR_RESPONSES)


@router.post("/plans", status_code=202, response_model=PlanAccepted, summary="Plan the retraining of a fleet (a job)")
def create_plan(
    body: PlanIn, session: SessionDep, settings: SettingsDep, principal: Principal = Depends(require("plan"))
) -> Any:
    bm = svc.get_model(session, body.model)
    require_broker()  # 503 before anything is written
    plan = svc.new_plan(session, body, bm)
    job = jobsvc.create_job(
        session, "plan", {"plan_id": plan.id}, subject=f"plan:{plan.id}", created_by=principal.key_prefix
    )
    session.commit()
    jobsvc.enqueue(job.id, get_celery(), settings)
    return {"plan": svc.plan_view(session, plan), "job": jobsvc.job_view(job)}


@router.get(
    "/plans/{plan_id}",
    response_model=PlanOut,
    dependencies=[Depends(require("read"))],
    summary="A plan: status, summary, one page of its groups and one page of its chips "
    "(cursor pagination as GET /chips, each list with its own cursor)",
)
def get_plan(
    plan_id: IdPath,
    session: SessionDep,
    settings: SettingsDep,
    limit: int = Query(100, ge=1, description="chips per page (at most the page_size_max setting)"),
    cursor: str | None = Query(None, description="next_cursor of the previous page"),
    groups_limit: int = Query(100, ge=1, description="groups per page (at most the page_size_max setting)"),
    groups_cursor: str | None = Query(None, description="next_groups_cursor of the previous page"),
) -> Any:
    plan = svc.get_plan(session, plan_id)
    after = decode_cursor(cursor, str) if cursor else None
    groups_after = decode_cursor(groups_cursor, int, "groups_cursor") if groups_cursor else None
    return svc.plan_view(
        session,
        plan,
        chips_after=after,
        chips_limit=min(limit, settings.page_size_max),
        groups_after=groups_after,
        groups_limit=min(groups_limit, settings.page_size_max),
    )


@router.post(
    "/plans/{plan_id}/execute",
    status_code=202,
    response_model=JobOut,
    summary="Retrain every group on the workers, verify every member chip, replan the misses (a job)",
)
def execute_plan(
    plan_id: IdPath, session: SessionDep, settings: SettingsDep, principal: Principal = Depends(require("plan"))
) -> Any:
    # The plan's row lock serializes concurrent executes (PostgreSQL; SQLite's writer lock does
    # it there): the second one waits, then finds the first one's job and returns it.
    plan = svc.get_plan(session, plan_id, for_update=True)
    if plan.document is None:
        msg = f"plan {plan_id} is {plan.status}: wait for its planning job to finish"
        raise ApiError(409, msg, [{"loc": ["path", "plan_id"], "msg": msg}])
    existing = session.scalars(
        select(Job).where(
            Job.subject == f"plan:{plan_id}",
            Job.kind == "execute_plan",
            Job.state.in_(("queued", "running", "succeeded")),
        )
    ).first()
    if existing is not None:  # executing twice is one execution
        return jobsvc.job_view(existing)
    require_broker()
    job = jobsvc.create_job(
        session, "execute_plan", {"plan_id": plan_id}, subject=f"plan:{plan_id}", created_by=principal.key_prefix
    )
    plan.status = "queued"
    session.commit()
    jobsvc.enqueue(job.id, get_celery(), settings)
    return jobsvc.job_view(job)


@router.get("/resilience-maps/{map_id}", response_model=ResilienceMapOut, dependencies=[Depends(require("read"))])
def get_resilience_map(map_id: IdPath, session: SessionDep) -> Any:
    return svc.resilience_map_view(svc.get_resilience_map(session, map_id))


@router.get(
    "/resilience-maps/{map_id}/plot.png",
    response_class=Response,
    dependencies=[Depends(require("read"))],
    responses={200: {"content": {"image/png": {}}}},
    summary="Worst-case accuracy heat map (epochs x fault rate), with the constraint's contour if given",
)
def plot_resilience_map(
    map_id: IdPath,
    session: SessionDep,
    max_drop: float | None = Query(
        default=None, ge=0, le=1, description="draw this constraint's contour; at most one of max_drop and min_accuracy"
    ),
    min_accuracy: float | None = Query(
        default=None, ge=0, le=1, description="draw this constraint's contour; at most one of max_drop and min_accuracy"
    ),
) -> Response:
    from planner import AccuracyConstraint, ResilienceMap

    rec = svc.get_resilience_map(session, map_id)
    if rec.document is None:
        msg = f"resilience map {map_id} is {rec.status}"
        raise ApiError(409, msg, [{"loc": ["path", "map_id"], "msg": msg}])
    if max_drop is not None and min_accuracy is not None:
        raise ApiError(422, "give at most one of max_drop or min_accuracy", [{"loc": ["query"], "msg": "both given"}])
    constraint = None
    if max_drop is not None:
        constraint = AccuracyConstraint.relative(max_drop)
    elif min_accuracy is not None:
        constraint = AccuracyConstraint.absolute(min_accuracy)
    with tempfile.TemporaryDirectory() as d:
        path = ResilienceMap.from_dict(rec.document).plot(
            Path(d) / "map.png", constraint, title=f"resilience map {map_id}"
        )
        return Response(path.read_bytes(), media_type="image/png")
