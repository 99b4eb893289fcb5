"""Job rows: creation, enqueueing, cancellation, and the lease protocol workers follow.

The ``jobs`` table, not the broker, is the source of truth. A worker runs a job only after
*claiming* it (a conditional UPDATE that hands out a fresh ``lease``); every later write by
that worker is conditional on the lease. A message delivered twice, or a worker presumed
dead that wakes up, therefore cannot run a job twice at once or overwrite a newer attempt.
A periodic sweep re-enqueues jobs whose worker stopped heart-beating (e.g. SIGKILL: the
embedded filesystem broker does not redeliver unacked messages) and queued jobs whose
message was lost.
"""

from __future__ import annotations

import logging
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Connection, Engine, and_, or_, select, update

from app.core.config import Settings
from app.db.base import utcnow
from app.db.models import Job

log = logging.getLogger("faultfleet.jobs")

TASK_NAME = "faultfleet.run_job"
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


def new_job_id() -> str:
    return uuid.uuid4().hex


def create_job(
    session: Any,
    kind: str,
    params: dict[str, Any] | None = None,
    subject: str | None = None,
    created_by: str | None = None,
    parent_id: str | None = None,
) -> Job:
    """Add a queued job to the session; commit, then `enqueue` it (the sweep re-sends lost ones)."""
    now = utcnow()
    job = Job(
        id=new_job_id(),
        kind=kind,
        state="queued",
        progress=0.0,
        message="queued",
        params=params or {},
        attempts=0,
        subject=subject,
        created_by=created_by,
        parent_id=parent_id,
        created_at=now,
        enqueued_at=now,
    )
    session.add(job)
    session.flush()
    return job


def enqueue(job_id: str, celery: Any, settings: Settings, countdown: float | None = None) -> bool:
    """Publish the job's message; False if the broker is unreachable (the job stays queued)."""
    try:
        celery.send_task(
            TASK_NAME,
            args=[job_id],
            queue=settings.queue,
            countdown=countdown,
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2, "interval_max": 0.5},
        )
        return True
    except Exception:  # broker down: the recovery sweep re-sends queued jobs later
        log.warning("could not publish job %s; it stays queued for the sweep", job_id, exc_info=True)
        return False


@dataclass(frozen=True)
class Claim:
    job_id: str
    lease: str
    kind: str
    params: dict[str, Any]
    checkpoint: dict[str, Any] | None
    attempts: int


class LeaseLost(Exception):
    """The job was cancelled, or re-claimed by another worker after this one went stale."""


def claim(engine: Engine, job_id: str, worker: str, settings: Settings) -> Claim | None:
    now = utcnow()
    stale = now - timedelta(seconds=settings.job_stale_after_s)
    lease = uuid.uuid4().hex
    with engine.begin() as conn:
        res = conn.execute(
            update(Job)
            .where(
                Job.id == job_id,
                or_(Job.state == "queued", and_(Job.state == "running", Job.heartbeat_at < stale)),
            )
            .values(
                state="running",
                lease=lease,
                worker=worker,
                attempts=Job.attempts + 1,
                heartbeat_at=now,
                started_at=now,
                message="running",
            )
        )
        if res.rowcount != 1:
            return None
        row = conn.execute(select(Job.kind, Job.params, Job.checkpoint, Job.attempts).where(Job.id == job_id)).one()
    if row.attempts > settings.job_max_attempts:
        finish(
            engine,
            job_id,
            lease,
            "failed",
            error=f"gave up after {row.attempts - 1} attempts: the worker running it was lost each time",
        )
        return None
    return Claim(job_id, lease, row.kind, row.params or {}, row.checkpoint, row.attempts)


def _owned(job_id: str, lease: str) -> Any:
    return and_(Job.id == job_id, Job.lease == lease, Job.state == "running")


def heartbeat(engine: Engine, job_id: str, lease: str) -> bool:
    with engine.begin() as conn:
        return conn.execute(update(Job).where(_owned(job_id, lease)).values(heartbeat_at=utcnow())).rowcount == 1


def report(
    engine: Engine,
    job_id: str,
    lease: str,
    fraction: float,
    message: str,
    checkpoint: dict[str, Any] | None = None,
) -> None:
    """Progress (and optionally a checkpoint) of the running attempt; raises `LeaseLost`."""
    values: dict[str, Any] = {
        "progress": max(0.0, min(1.0, float(fraction))),
        "message": message[:2000],
        "heartbeat_at": utcnow(),
    }
    if checkpoint is not None:
        values["checkpoint"] = checkpoint
    with engine.begin() as conn:
        if conn.execute(update(Job).where(_owned(job_id, lease)).values(**values)).rowcount != 1:
            raise LeaseLost(job_id)


def finish(
    engine: Engine,
    job_id: str,
    lease: str,
    state: str,
    result: dict[str, Any] | None = None,
    error: str | None = None,
    also: Callable[[Connection], None] | None = None,
) -> bool:
    """End a job the caller holds the lease of. `also(connection)` runs in the same
    transaction, only when the lease still held (a failed job marks its subject failed
    with it, so the two never disagree)."""
    assert state in TERMINAL
    values: dict[str, Any] = {"state": state, "finished_at": utcnow(), "lease": None}
    if state == "succeeded":
        values.update(progress=1.0, message="done", result=result, error=None)
    else:
        values.update(message=state, error=error)
    with engine.begin() as conn:
        owned = conn.execute(update(Job).where(_owned(job_id, lease)).values(**values)).rowcount == 1
        if owned and also is not None:
            also(conn)
        return owned


def format_error(exc: BaseException) -> str:
    last = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return last[:4000]


def cancel(engine: Engine, job_id: str) -> str | None:
    """Cancel a queued or running job. Returns the state after the call (None: no such job).

    A running worker notices at its next heartbeat or progress report and stops.
    """
    with engine.begin() as conn:
        conn.execute(
            update(Job)
            .where(Job.id == job_id, Job.state.in_(("queued", "running")))
            .values(state="cancelled", finished_at=utcnow(), lease=None, message="cancelled")
        )
        return conn.execute(select(Job.state).where(Job.id == job_id)).scalar()


def sweep(engine: Engine, settings: Settings, celery: Any, dead_worker: str | None = None) -> list[str]:
    """Re-enqueue jobs a lost worker left 'running' and queued jobs whose message got lost.

    `dead_worker`: a node name known to be dead (a worker restarting under its old name),
    whose running jobs are re-enqueued without waiting for their heartbeat to go stale.
    Safe to run from many workers at once: each row is taken by one conditional UPDATE.
    """
    now = utcnow()
    stale = now - timedelta(seconds=settings.job_stale_after_s)
    lost = now - timedelta(seconds=settings.job_requeue_queued_after_s)
    running_lost: Any = and_(Job.state == "running", Job.heartbeat_at < stale)
    if dead_worker:
        running_lost = or_(running_lost, and_(Job.state == "running", Job.worker == dead_worker))
    with engine.begin() as conn:
        revived = [
            r[0]
            for r in conn.execute(
                update(Job)
                .where(running_lost)
                .values(state="queued", lease=None, enqueued_at=now, message="re-enqueued: its worker was lost")
                .returning(Job.id)
            )
        ]
        resent = [
            r[0]
            for r in conn.execute(
                update(Job)
                .where(Job.state == "queued", or_(Job.enqueued_at.is_(None), Job.enqueued_at < lost))
                .values(enqueued_at=now)
                .returning(Job.id)
            )
        ]
    for job_id in revived + resent:
        enqueue(job_id, celery, settings)
    if revived or resent:
        log.warning(
            "recovery sweep: re-enqueued %d lost running job(s) %s, re-sent %d queued",
            len(revived),
            revived,
            len(resent),
        )
    return revived + resent


def job_view(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "kind": job.kind,
        "state": job.state,
        "progress": {"fraction": job.progress, "message": job.message},
        "params": job.params or {},
        "result": job.result,
        "error": job.error,
        "attempts": job.attempts,
        "subject": job.subject,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "heartbeat_at": job.heartbeat_at,
    }
