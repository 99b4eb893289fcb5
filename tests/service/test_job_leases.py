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


def _claim_in_a_process_then_die(engine: Engine, settings: Settings, job_id: str, node: str) -> None:
    """Claim `job_id` in a separate Python process, then SIGKILL it (a worker losing power)."""
    import os
    import signal
    import subprocess
    import sys

    code = (
        "import sys, time\n"
        "from app.core.config import Settings\n"
        "from app.db.session import make_engine\n"
        "from app.services import jobs\n"
        f"s = Settings(database_url={str(engine.url)!r})\n"
        f"assert jobs.claim(make_engine(s), {job_id!r}, {node!r}, s) is not None\n"
        "print('claimed', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "claimed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def test_sweep_takes_back_only_the_jobs_of_dead_processes(env: tuple[Engine, Settings]) -> None:
    """A restarted worker (same node name) must not take back what live processes just claimed."""
    engine, settings = env
    dead_job, live_job, remote_job = _new_job(engine), _new_job(engine), _new_job(engine)
    _claim_in_a_process_then_die(engine, settings, dead_job, "w1@host")
    _claim_in_a_process_then_die(engine, settings, remote_job, "w1@host")
    with engine.begin() as conn:  # as if that process ran on another machine: its PID means nothing here
        conn.execute(update(Job).where(Job.id == remote_job).values(worker_host="elsewhere/0/0"))
    live = jobsvc.claim(engine, live_job, "w1@host", settings)  # this live process, same node name
    assert live is not None
    assert _state(engine, dead_job).worker_pid not in (None, _state(engine, live_job).worker_pid)

    celery = RecordingCelery()
    assert jobsvc.sweep(engine, settings, celery) == [dead_job]  # at once, no heartbeat timeout
    assert celery.sent == [dead_job] and _state(engine, dead_job).state == "queued"
    assert _state(engine, live_job).state == "running" and _state(engine, remote_job).state == "running"
    jobsvc.report(engine, live_job, live.lease, 0.5, "still mine")  # its lease is intact

    time.sleep(settings.job_stale_after_s + 0.2)  # the remote one is lost only once its heartbeat is stale
    jobsvc.heartbeat(engine, live_job, live.lease)
    assert jobsvc.sweep(engine, settings, celery) == [remote_job]


def test_lost_queued_message_is_resent(env: tuple[Engine, Settings]) -> None:
    engine, settings = env
    settings = settings.model_copy(update={"job_requeue_queued_after_s": 0.2})
    job_id = _new_job(engine)
    celery = RecordingCelery()
    assert jobsvc.sweep(engine, settings, celery) == []
    time.sleep(0.3)
    assert jobsvc.sweep(engine, settings, celery) == [job_id]
    assert jobsvc.sweep(engine, settings, celery) == []  # enqueued_at was refreshed


def test_unsent_job_is_sent_at_the_next_sweep_and_all_queued_after_a_broker_outage(
    env: tuple[Engine, Settings],
) -> None:
    from app.core import queue

    class DeadBroker:
        def send_task(self, *_a: Any, **_kw: Any) -> None:
            raise ConnectionRefusedError("broker down")

    engine, settings = env
    job_id, other = _new_job(engine), _new_job(engine)
    queue.broker_ok()
    try:
        assert jobsvc.enqueue(job_id, DeadBroker(), settings, engine) is False
        assert queue.broker_down()  # the next publishes are skipped at once ...
        assert _state(engine, job_id).enqueued_at is None  # ... and the job is marked unsent
    finally:
        queue.broker_ok()
    celery = RecordingCelery()
    assert jobsvc.sweep(engine, settings, celery) == [job_id]  # not waiting job_requeue_queued_after_s
    assert jobsvc.sweep(engine, settings, celery) == []
    # the broker came back empty (a Redis without persistence): every queued job is sent again
    assert sorted(jobsvc.sweep(engine, settings, celery, resend_all_queued=True)) == sorted([job_id, other])


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
