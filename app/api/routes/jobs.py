from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from sqlalchemy import select

from app.api.deps import Principal, SessionDep, SettingsDep, require
from app.api.errors import ApiError
from app.core.queue import get_celery, require_broker
from app.db.models import Job
from app.db.session import get_engine
from app.schemas.common import ERROR_RESPONSES
from app.schemas.jobs import FleetStatsIn, JobOut
from app.services import jobs as jobsvc

router = APIRouter(tags=["jobs"], responses=ERROR_RESPONSES)


def _get(session: Any, job_id: str) -> Job:
    job = session.scalar(select(Job).where(Job.id == job_id))
    if job is None:
        raise ApiError(404, f"no job {job_id!r}", [{"loc": ["path", "job_id"], "msg": "not found"}])
    return job


@router.get("/jobs/{job_id}", response_model=JobOut, dependencies=[Depends(require("read"))])
def get_job(job_id: str, session: SessionDep) -> Any:
    return jobsvc.job_view(_get(session, job_id))


@router.get(
    "/jobs/{job_id}/children",
    response_model=list[JobOut],
    dependencies=[Depends(require("read"))],
    summary="The jobs a job started (e.g. one retraining job per group of an executing plan), oldest first",
)
def get_job_children(job_id: str, session: SessionDep) -> Any:
    _get(session, job_id)
    rows = session.scalars(select(Job).where(Job.parent_id == job_id).order_by(Job.created_at, Job.id))
    return [jobsvc.job_view(j) for j in rows]


@router.delete(
    "/jobs/{job_id}",
    response_model=JobOut,
    dependencies=[Depends(require("plan"))],
    summary="Cancel a queued or running job (409 if it already finished)",
)
def cancel_job(job_id: str, session: SessionDep) -> Any:
    job = _get(session, job_id)
    if job.state in ("succeeded", "failed"):
        msg = f"job {job_id} already {job.state}"
        raise ApiError(409, msg, [{"loc": ["path", "job_id"], "msg": msg}])
    session.rollback()  # end this read transaction first (SQLite: one writer at a time)
    jobsvc.cancel(get_engine(), job_id)
    session.expire_all()
    return jobsvc.job_view(_get(session, job_id))


@router.post(
    "/fleet/stats",
    status_code=202,
    response_model=JobOut,
    summary="Start a job computing fleet statistics over the stored chips (re-validating each map)",
)
def start_fleet_stats(
    body: FleetStatsIn,
    session: SessionDep,
    settings: SettingsDep,
    principal: Principal = Depends(require("plan")),
) -> Any:
    require_broker()
    job = jobsvc.create_job(session, "fleet_stats", body.model_dump(), subject="fleet", created_by=principal.key_prefix)
    session.commit()
    jobsvc.enqueue(job.id, get_celery(), settings)
    return jobsvc.job_view(job)
