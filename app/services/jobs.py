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

import contextlib
import logging
import os
import socket
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, and_, func, or_, select, true, update

from app.core.config import Settings
from app.db.base import utcnow
from app.db.models import Job, WorkerHeartbeat

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


def enqueue(job_id: str, celery: Any, settings: Settings, engine: Engine | None = None) -> bool:
    """Publish the job's message; False if the broker is unreachable (the job stays queued).

    Publishing is bounded (one quick retry, short socket timeouts), and skipped at once while
    the broker is known down (`app.core.queue.broker_down`), so a dead broker never stalls the
    caller. A job whose message could not be sent gets ``enqueued_at = NULL`` (in `engine`,
    default the service's), which the recovery sweep re-sends at its next run once the broker is back.
    """
    from app.core import queue

    if not queue.broker_down():
        try:
            celery.send_task(
                TASK_NAME,
                args=[job_id],
                queue=settings.queue,
                retry=True,
                retry_policy={"max_retries": 1, "interval_start": 0.1, "interval_step": 0.2, "interval_max": 0.2},
            )
            queue.broker_ok()
            return True
        except Exception as exc:  # broker down: the recovery sweep re-sends queued jobs later
            queue.broker_failed(exc)
            log.warning("could not publish job %s (%s); it stays queued for the sweep", job_id, exc)
    if engine is None:
        from app.db.session import get_engine

        engine = get_engine()
    try:
        with engine.begin() as conn:
            conn.execute(update(Job).where(Job.id == job_id, Job.state == "queued").values(enqueued_at=None))
    except Exception:
        log.warning("could not mark job %s unsent; the sweep re-sends it later anyway", job_id, exc_info=True)
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


_HOST: str | None = None


def process_host() -> str:
    """Where a PID means something: host name, boot and PID namespace. Two processes with equal
    `process_host()` see each other's PIDs, so one can tell whether the other is still alive."""
    global _HOST
    if _HOST is None:
        parts = [socket.gethostname()]
        with contextlib.suppress(OSError):
            parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8])
        with contextlib.suppress(OSError):
            parts.append(os.readlink("/proc/self/ns/pid").removeprefix("pid:"))
        _HOST = "/".join(parts)[:255]
    return _HOST


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def claim(engine: Engine, job_id: str, worker: str, settings: Settings) -> Claim | None:
    """Take a queued job (or a running one whose worker was lost) for this process."""
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
                worker_host=process_host(),
                worker_pid=os.getpid(),
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


def sweep(engine: Engine, settings: Settings, celery: Any, resend_all_queued: bool = False) -> list[str]:
    """Re-enqueue jobs a lost worker left 'running' and queued jobs whose message got lost.

    A running job is lost when its heartbeat went stale, or at once when it ran on this host
    (same `process_host()`) under a PID that no longer exists: a SIGKILLed worker restarting
    here takes back only its dead processes' jobs, never what live processes (its own new ones,
    or another worker sharing its node name) have claimed. `resend_all_queued`: the broker came
    back and may have lost its messages, so every queued job is sent again (a duplicate is a no-op).
    Safe to run from many workers at once: each row is taken by one conditional UPDATE.
    """
    now = utcnow()
    stale = now - timedelta(seconds=settings.job_stale_after_s)
    lost = now - timedelta(seconds=settings.job_requeue_queued_after_s)
    revive = dict(state="queued", lease=None, enqueued_at=now, message="re-enqueued: its worker was lost")
    with engine.begin() as conn:
        revived = [
            r[0]
            for r in conn.execute(
                update(Job).where(Job.state == "running", Job.heartbeat_at < stale).values(**revive).returning(Job.id)
            )
        ]
        here = conn.execute(
            select(Job.id, Job.lease, Job.worker_pid).where(
                Job.state == "running", Job.worker_host == process_host(), Job.worker_pid.is_not(None)
            )
        ).all()
        for job_id, lease, pid in here:
            if pid is None or pid_alive(pid):
                continue
            res = conn.execute(
                update(Job).where(Job.id == job_id, Job.lease == lease, Job.state == "running").values(**revive)
            )
            if res.rowcount == 1:
                revived.append(job_id)
        unsent = or_(Job.enqueued_at.is_(None), Job.enqueued_at < lost)
        resent = [
            r[0]
            for r in conn.execute(
                update(Job)
                .where(Job.state == "queued", true() if resend_all_queued else unsent)
                .values(enqueued_at=now)
                .returning(Job.id)
            )
        ]
    for job_id in revived + resent:
        enqueue(job_id, celery, settings, engine)
    if revived or resent:
        log.warning(
            "recovery sweep: re-enqueued %d lost running job(s) %s, re-sent %d queued",
            len(revived),
            revived,
            len(resent),
        )
    return revived + resent


# --- worker heartbeats: which worker processes are alive (what /readyz reports) ----------------


def worker_id(nodename: str) -> str:
    return f"{nodename}/{process_host()}/{os.getpid()}"[:255]


def worker_heartbeat(engine: Engine, nodename: str, started_at: datetime) -> None:
    """Record that this worker process is alive (an upsert of its row)."""
    now = utcnow()
    wid = worker_id(nodename)
    with engine.begin() as conn:
        res = conn.execute(
            update(WorkerHeartbeat).where(WorkerHeartbeat.id == wid).values(heartbeat_at=now, stopped_at=None)
        )
        if res.rowcount == 0:
            conn.execute(
                WorkerHeartbeat.__table__.insert().values(  # type: ignore[attr-defined]
                    id=wid,
                    nodename=nodename,
                    host=process_host(),
                    pid=os.getpid(),
                    started_at=started_at,
                    heartbeat_at=now,
                )
            )
        # rows of workers gone for a day are history nobody reads
        conn.execute(
            WorkerHeartbeat.__table__.delete().where(  # type: ignore[attr-defined]
                WorkerHeartbeat.heartbeat_at < now - timedelta(days=1)
            )
        )


def worker_stopped(engine: Engine, nodename: str) -> None:
    with engine.begin() as conn:
        conn.execute(
            update(WorkerHeartbeat).where(WorkerHeartbeat.id == worker_id(nodename)).values(stopped_at=utcnow())
        )


def worker_health(engine: Engine, settings: Settings) -> dict[str, Any]:
    """Workers that heart-beat within `worker_stale_after_s`, and when one was last seen."""
    now = utcnow()
    alive_after = now - timedelta(seconds=settings.worker_stale_after_s)
    with engine.connect() as conn:
        alive = conn.execute(
            select(func.count()).where(
                WorkerHeartbeat.heartbeat_at >= alive_after, WorkerHeartbeat.stopped_at.is_(None)
            )
        ).scalar_one()
        last = conn.execute(select(func.max(WorkerHeartbeat.heartbeat_at))).scalar()
    if last is not None and last.tzinfo is None:  # SQLite returns naive datetimes; they are UTC
        last = last.replace(tzinfo=UTC)
    last_seen_s = None if last is None else round((now - last).total_seconds(), 1)
    if alive:
        status = "ok"
    elif last_seen_s is None:
        status = "no worker has ever been seen"
    else:
        status = f"no worker seen for {last_seen_s:.0f} s"
    return {"status": status, "alive": alive, "last_seen_s": last_seen_s}


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
