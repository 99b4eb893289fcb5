"""Running a job row on a worker: claim, heartbeat, progress/checkpoints, finish.

Job kinds register a handler with `@handler("kind")`; the handler gets a `JobContext` and
returns the job's JSON result. A handler must be idempotent and resumable: it reads
`ctx.checkpoint` (None on a first attempt) and saves one with `ctx.report(..., checkpoint=)`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from celery import group as celery_group
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.config import Settings, get_settings
from app.db.models import Job
from app.db.session import get_engine
from app.services import jobs as jobsvc
from workers.celery_app import celery_app

log = logging.getLogger("faultfleet.worker")

Handler = Callable[["JobContext"], dict[str, Any]]
HANDLERS: dict[str, Handler] = {}
# kind -> what marks a failed job's subject failed: (job params, error) -> a statement run in
# the transaction that fails the job (so a failed job never leaves its subject 'pending')
FailureMark = Callable[[dict[str, Any], str], Any]
ON_FAILURE: dict[str, FailureMark] = {}


def handler(kind: str, on_failure: FailureMark | None = None) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        HANDLERS[kind] = fn
        if on_failure is not None:
            ON_FAILURE[kind] = on_failure
        return fn

    return register


class JobAborted(Exception):
    """Raised inside a handler when the job was cancelled or taken over by another worker."""


class JobContext:
    def __init__(self, claim: jobsvc.Claim, settings: Settings) -> None:
        self.job_id = claim.job_id
        self.kind = claim.kind
        self.params = claim.params
        self.checkpoint = claim.checkpoint
        self.attempt = claim.attempts
        self.settings = settings
        self.engine = get_engine()
        self._lease = claim.lease
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._beat_loop, name=f"heartbeat-{claim.job_id}", daemon=True)

    # heartbeat in the background, so a long step (an epoch) does not look like a dead worker
    def _beat_loop(self) -> None:
        while not self._stop.wait(self.settings.job_heartbeat_s):
            try:
                if not jobsvc.heartbeat(self.engine, self.job_id, self._lease):
                    self._lost.set()
                    return
            except Exception:
                log.warning("heartbeat of job %s failed", self.job_id, exc_info=True)

    def __enter__(self) -> JobContext:
        self._beat.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._beat.join(timeout=5)

    @property
    def aborted(self) -> bool:
        return self._lost.is_set()

    def check(self) -> None:
        if self._lost.is_set():
            raise JobAborted(self.job_id)

    def report(self, fraction: float, message: str, checkpoint: dict[str, Any] | None = None) -> None:
        """Store progress (and a checkpoint to resume from); raises `JobAborted` if cancelled."""
        self.check()
        try:
            jobsvc.report(self.engine, self.job_id, self._lease, fraction, message, checkpoint)
        except jobsvc.LeaseLost:
            self._lost.set()
            raise JobAborted(self.job_id) from None
        if checkpoint is not None:
            self.checkpoint = checkpoint

    def finish(self, state: str, result: dict[str, Any] | None = None, error: str | None = None) -> bool:
        mark = ON_FAILURE.get(self.kind) if state == "failed" else None
        also = None if mark is None else (lambda conn: conn.execute(mark(self.params, error or state)))
        return jobsvc.finish(self.engine, self.job_id, self._lease, state, result=result, error=error, also=also)


def run_job(job_id: str, worker: str) -> str:
    """Claim and run a job; returns what happened (for logs). Safe to call twice for one id."""
    settings = get_settings()
    claim = jobsvc.claim(get_engine(), job_id, worker, settings)
    if claim is None:
        return "skipped (finished, cancelled, missing, or running elsewhere)"
    fn = HANDLERS.get(claim.kind)
    with JobContext(claim, settings) as ctx:
        if fn is None:
            ctx.finish("failed", error=f"no handler for job kind {claim.kind!r} on this worker")
            return "failed"
        try:
            result = fn(ctx)
        except JobAborted:
            return "aborted (cancelled or taken over)"
        except Exception as exc:
            if _is_infrastructure(exc):
                # database/broker trouble: leave the row 'running'; its heartbeat goes stale
                # and the sweep re-enqueues it, resuming from the last checkpoint.
                raise
            log.exception("job %s (%s) failed", job_id, claim.kind)
            ctx.finish("failed", error=jobsvc.format_error(exc))
            return "failed"
        ctx.finish("succeeded", result=result)
        return "succeeded"


def _is_infrastructure(exc: BaseException) -> bool:
    """Database or network trouble, not a bug of the job: retry it (bounded by job_max_attempts)."""
    from sqlalchemy.exc import InterfaceError, OperationalError

    return isinstance(exc, (OperationalError, InterfaceError, ConnectionError, TimeoutError))


# --- fan-out of child jobs -----------------------------------------------------------------


def gather_children(
    ctx: JobContext,
    specs: Sequence[tuple[str, str, dict[str, Any]]],
    *,
    progress: tuple[float, float],
    label: str,
) -> dict[str, dict[str, Any]]:
    """Run child jobs (subject, kind, params) of `ctx`'s job to the end; subject -> result.

    Children that already exist (a resumed parent) are reused, not created again. Raises
    RuntimeError naming the first child that failed; cancels the children if the parent
    is cancelled.
    """
    with Session(ctx.engine, expire_on_commit=False) as s:
        existing = {j.subject: j.id for j in s.scalars(select(Job).where(Job.parent_id == ctx.job_id))}
        fresh = []
        for subject, kind, params in specs:
            if subject not in existing:
                job = jobsvc.create_job(s, kind, params, subject=subject, parent_id=ctx.job_id)
                existing[subject] = job.id
                fresh.append(job.id)
        s.commit()
    ids = {subject: existing[subject] for subject, _, _ in specs}
    if fresh:
        queue = ctx.settings.queue
        celery_group(celery_app.signature(jobsvc.TASK_NAME, args=[j], queue=queue) for j in fresh).apply_async()
    lo, hi = progress
    try:
        while True:
            with Session(ctx.engine, expire_on_commit=False) as s:
                rows = {
                    j.id: (j.state, j.error or j.message, j.result)
                    for j in s.scalars(select(Job).where(Job.id.in_(ids.values())))
                }
            failed = [(subj, rows[j]) for subj, j in ids.items() if rows[j][0] in ("failed", "cancelled")]
            if failed:
                subj, (state, error, _) = failed[0]
                raise RuntimeError(f"{label} {subj} {state}: {error}")
            done = sum(1 for j in ids.values() if rows[j][0] == "succeeded")
            ctx.report(lo + (hi - lo) * done / max(len(ids), 1), f"{label}: {done}/{len(ids)} done")
            if done == len(ids):
                return {subj: dict(rows[j][2] or {}) for subj, j in ids.items()}
            queued = [j for j in ids.values() if rows[j][0] == "queued"]
            if queued:
                run_job(queued[0], worker=f"{socket.gethostname()}:{os.getpid()}/inline")  # help instead of idling
            else:
                time.sleep(0.3)
    except JobAborted:
        for j in ids.values():
            jobsvc.cancel(ctx.engine, j)
        raise
