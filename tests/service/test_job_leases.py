"""The job-row lease protocol that makes tasks idempotent and lets the sweep recover lost jobs.

In-process on a SQLite file (the end-to-end path with real workers is in test_jobs.py).
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.db.base import utcnow
from app.db.migrate import upgrade
from app.db.models import Job
from app.db.session import make_engine
from app.services import jobs as jobsvc


class RecordingCelery:
    """Stands in for the broker: records what would be published."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def send_task(self, name: str, args: list[Any], **_kw: Any) -> None:
        assert name == jobsvc.TASK_NAME
        self.sent.append(args[0])


@pytest.fixture
def env(tmp_path: Path) -> tuple[Engine, Settings]:
    settings = Settings(var_dir=tmp_path / "var", job_stale_after_s=2, job_max_attempts=3)
    upgrade(settings.database_url)
    return make_engine(settings), settings


def _new_job(engine: Engine) -> str:
    with Session(engine) as s:
        job = jobsvc.create_job(s, "fleet_stats", {"batch_size": 1})
        s.commit()
        return job.id


def _state(engine: Engine, job_id: str) -> Job:
    with Session(engine) as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def test_claim_is_exclusive_and_writes_need_the_lease(env: tuple[Engine, Settings]) -> None:
    engine, settings = env
    job_id = _new_job(engine)
    first = jobsvc.claim(engine, job_id, "w1", settings)
    assert first is not None and first.attempts == 1
    assert jobsvc.claim(engine, job_id, "w2", settings) is None  # duplicate delivery: no-op
    jobsvc.report(engine, job_id, first.lease, 0.5, "half", checkpoint={"after": 7})
    job = _state(engine, job_id)
    assert (job.state, job.progress, job.checkpoint) == ("running", 0.5, {"after": 7})
    with pytest.raises(jobsvc.LeaseLost):
        jobsvc.report(engine, job_id, "not-the-lease", 0.6, "x")
    assert jobsvc.finish(engine, job_id, first.lease, "succeeded", result={"ok": 1})
    assert jobsvc.claim(engine, job_id, "w2", settings) is None  # finished: never runs again
    assert _state(engine, job_id).result == {"ok": 1}


def test_stale_job_is_taken_over_and_the_old_worker_cannot_write(env: tuple[Engine, Settings]) -> None:
    engine, settings = env
    job_id = _new_job(engine)
    old = jobsvc.claim(engine, job_id, "w1", settings)
    assert old is not None
    jobsvc.report(engine, job_id, old.lease, 0.3, "30%", checkpoint={"after": 3})
    with engine.begin() as conn:  # w1 stops heart-beating
        conn.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(seconds=5)))
    celery = RecordingCelery()
    assert jobsvc.sweep(engine, settings, celery) == [job_id] and celery.sent == [job_id]
    assert _state(engine, job_id).state == "queued"
    new = jobsvc.claim(engine, job_id, "w2", settings)
    assert new is not None and new.attempts == 2 and new.checkpoint == {"after": 3}  # resumes
    with pytest.raises(jobsvc.LeaseLost):  # the presumed-dead worker wakes up
        jobsvc.report(engine, job_id, old.lease, 0.9, "late")
    assert not jobsvc.finish(engine, job_id, old.lease, "succeeded", result={"stale": True})
    assert jobsvc.finish(engine, job_id, new.lease, "succeeded", result={"fresh": True})
    assert _state(engine, job_id).result == {"fresh": True}


def test_restarted_node_recovers_its_jobs_at_once(env: tuple[Engine, Settings]) -> None:
    engine, settings = env
    job_id = _new_job(engine)
    assert jobsvc.claim(engine, job_id, "w1@host", settings) is not None
    celery = RecordingCelery()
    assert jobsvc.sweep(engine, settings, celery) == []  # heartbeat fresh: left alone
    assert jobsvc.sweep(engine, settings, celery, dead_worker="w1@host") == [job_id]


def test_lost_queued_message_is_resent(env: tuple[Engine, Settings]) -> None:
    engine, settings = env
    settings = settings.model_copy(update={"job_requeue_queued_after_s": 0.2})
    job_id = _new_job(engine)
    celery = RecordingCelery()
    assert jobsvc.sweep(engine, settings, celery) == []
    time.sleep(0.3)
    assert jobsvc.sweep(engine, settings, celery) == [job_id]
    assert jobsvc.sweep(engine, settings, celery) == []  # enqueued_at was refreshed


def test_a_job_that_keeps_killing_workers_fails(env: tuple[Engine, Settings]) -> None:
    engine, settings = env
    job_id = _new_job(engine)
    for _ in range(settings.job_max_attempts):
        assert jobsvc.claim(engine, job_id, "w", settings) is not None
        with engine.begin() as conn:
            conn.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(seconds=5)))
    assert jobsvc.claim(engine, job_id, "w", settings) is None
    job = _state(engine, job_id)
    assert job.state == "failed" and "gave up" in (job.error or "")


def test_cancel(env: tuple[Engine, Settings]) -> None:
    engine, settings = env
    job_id = _new_job(engine)
    claim = jobsvc.claim(engine, job_id, "w", settings)
    assert claim is not None
    assert jobsvc.cancel(engine, job_id) == "cancelled"
    assert not jobsvc.heartbeat(engine, job_id, claim.lease)  # the worker learns it lost the job
    assert not jobsvc.finish(engine, job_id, claim.lease, "succeeded", result={})
    with Session(engine) as s:
        assert s.scalar(select(Job.state).where(Job.id == job_id)) == "cancelled"
    assert jobsvc.cancel(engine, "nope") is None
