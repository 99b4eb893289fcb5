"""Running a job row on a worker: claim, heartbeat, progress/checkpoints, finish.

Job kinds register a handler with `@handler("kind")`; the handler gets a `JobContext` and
returns the job's JSON result. A handler must be idempotent and resumable: it reads
`ctx.checkpoint` (None on a first attempt) and saves one with `ctx.report(..., checkpoint=)`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from app.core.config import Settings, get_settings
from app.db.session import get_engine
from app.services import jobs as jobsvc

log = logging.getLogger("faultfleet.worker")

Handler = Callable[["JobContext"], dict[str, Any]]
HANDLERS: dict[str, Handler] = {}


def handler(kind: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        HANDLERS[kind] = fn
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
        return jobsvc.finish(self.engine, self.job_id, self._lease, state, result=result, error=error)


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
