"""The pending late-chip job under the two races that matter, on real PostgreSQL transactions.

A chip joining the accelerator's pending job while a worker claims it: either the join commits
first and the claim reads the chip in the job's params, or the claim commits first and the chip
starts a new job. Never a chip in no job, never two pending jobs.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.db.migrate import upgrade
from app.db.models import Chip, Job, PlanRecord
from app.db.session import make_engine
from app.services import jobs as jobsvc
from app.services import plans as plansvc
from tests.rows import base_model_row

pytestmark = pytest.mark.integration


@pytest.fixture
def engine(pg_database: str, tmp_path: Path) -> Iterator[Engine]:
    upgrade(pg_database)
    eng = make_engine(Settings(database_url=pg_database, var_dir=tmp_path))
    with Session(eng) as s:
        bm = base_model_row(s, profile="p", size=4)
        s.add(PlanRecord(base_model_id=bm.id, status="executed", constraint={}, document={"chips": []}))
        for i in range(4):
            s.add(Chip(chip_id=f"c{i}", accelerator_id=bm.accelerator_id, **_chip_fields()))
        s.commit()
    try:
        yield eng
    finally:
        eng.dispose()


def _chip_fields() -> dict[str, Any]:
    fm = {"array": {"rows": 4, "cols": 4}, "faults": []}
    return {"fault_map": fm, "content_hash": "h", "faults_digest": "d", "n_faults": 0, "fault_rate": 0.0}


def _pk(engine: Engine, chip_id: str) -> int:
    with Session(engine) as s:
        return int(s.scalar(select(Chip.id).where(Chip.chip_id == chip_id)))


def _join(engine: Engine, chip_id: str) -> tuple[str, bool]:
    with Session(engine) as s:
        (joined,) = plansvc.late_assignment_jobs(s, [chip_id])
        s.commit()
    return joined


def _in_thread(fn: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    return t, out


def _pending(engine: Engine) -> int:
    with Session(engine) as s:
        return int(
            s.scalar(select(func.count()).where(Job.kind == "assign_chip", Job.state == "queued", Job.attempts == 0))
        )


def test_a_join_before_the_claim_commits_is_in_what_the_claim_reads(engine: Engine, tmp_path: Path) -> None:
    job_id, new = _join(engine, "c0")
    assert new and _join(engine, "c1") == (job_id, False)  # joined, not a second job
    with Session(engine) as joining:
        assert plansvc.late_assignment_jobs(joining, ["c2"]) == [(job_id, False)]  # row locked until commit
        claimer, claimed = _in_thread(lambda: jobsvc.claim(engine, job_id, "w", Settings(var_dir=tmp_path)))
        claimer.join(0.5)
        assert claimer.is_alive()  # the claim waits for the joining transaction
        joining.commit()
    claimer.join(10)
    assert claimed and claimed[0] is not None
    assert sorted(claimed[0].params["chip_pks"]) == sorted(_pk(engine, f"c{i}") for i in range(3))
    assert _pending(engine) == 0


def test_a_join_after_the_claim_starts_the_next_job(engine: Engine) -> None:
    job_id, _ = _join(engine, "c0")
    with Session(engine) as claiming:  # what `jobs.claim` does, held open
        claiming.execute(update(Job).where(Job.id == job_id, Job.state == "queued").values(state="running", attempts=1))
        joiner, joined = _in_thread(lambda: _join(engine, "c3"))
        joiner.join(0.5)
        assert joiner.is_alive()  # the join waits for the claiming transaction
        claiming.commit()
    joiner.join(10)
    assert joined and joined[0][0] != job_id and joined[0][1]  # a new job, for the caller to publish
    with Session(engine) as s:
        new = s.get(Job, joined[0][0])
        assert new is not None and new.params["chip_pks"] == [_pk(engine, "c3")] and new.state == "queued"
        old = s.get(Job, job_id)
        assert old is not None and old.params["chip_pks"] == [_pk(engine, "c0")]
    assert _pending(engine) == 1
