"""The single-POST ingest path's shortcuts keep its behaviour: late-chip hook, auth cache, validation."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, create_engine, func, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.db.migrate import upgrade
from app.db.models import AcceleratorProfile, Chip, ChipRevision, ModelRecord, PlanRecord
from app.db.session import make_engine
from app.services import chips as svc
from app.services.profiles import ProfileInfo, get_profile

pytestmark = pytest.mark.integration


@contextmanager
def _executed_plan(database_url: str, accelerator: str, uid: str) -> Iterator[None]:
    """An executed plan for `accelerator` while the block runs (rows written directly: building a real
    one takes training); afterwards it is marked failed so that no other test sees it."""
    engine = create_engine(database_url)
    try:
        with Session(engine) as s:
            prof = s.scalar(select(AcceleratorProfile.id).where(AcceleratorProfile.name == accelerator))
            assert prof is not None
            bm = ModelRecord(name=f"bm-{uid}", architecture="lenet5", dataset="mnist", accelerator_id=prof)
            s.add(bm)
            s.flush()
            plan = PlanRecord(base_model_id=bm.id, status="executed", constraint={"max_accuracy_drop": 0.01})
            s.add(plan)
            s.commit()
            plan_id = plan.id
        try:
            yield
        finally:
            with Session(engine) as s:
                s.execute(update(PlanRecord).where(PlanRecord.id == plan_id).values(status="failed"))
                s.commit()
    finally:
        engine.dispose()


def test_late_chip_hook_runs_only_when_an_executed_plan_exists(
    service: Any, accelerator: str, uid: str, make_map: Any
) -> None:
    with service.client() as c:
        r = c.post("/api/v1/chips", json=make_map(f"early-{uid}", accelerator))
        assert r.status_code == 201, r.text
        assert "assignment_job" not in r.json()
        with _executed_plan(service.database_url, accelerator, uid):
            r = c.post("/api/v1/chips", json=make_map(f"late-{uid}", accelerator))
            assert r.status_code == 201, r.text
            assert r.json().get("assignment_job"), r.json()
            # an identical re-POST changes nothing, so it starts no job
            r = c.post("/api/v1/chips", json=make_map(f"late-{uid}", accelerator))
            assert r.status_code == 200 and r.json()["status"] == "unchanged"
            assert "assignment_job" not in r.json()
            # a replaced map is new to the plan too
            r = c.post("/api/v1/chips", params={"replace": "true"}, json=make_map(f"early-{uid}", accelerator, seed=7))
            assert r.status_code == 200 and r.json()["status"] == "replaced", r.text
            assert r.json().get("assignment_job"), r.json()
            # a chip of another accelerator: that plan does not concern it
            other = f"other-{uid}"
            body = {"name": other, "rows": 32, "cols": 32, "fmt": "int8", "bypass": True}
            assert c.post("/api/v1/accelerators", json=body).status_code == 201
            r = c.post("/api/v1/chips", json=make_map(f"other-{uid}", other))
            assert r.status_code == 201, r.text
            assert "assignment_job" not in r.json()


def _terminate(admin_url: str, pid: int) -> None:
    with psycopg.connect(admin_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as c:
        c.execute("SELECT pg_terminate_backend(%s)", (pid,))


def _backend_pid(engine: Engine) -> int:
    with engine.connect() as c:
        return int(c.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())


def test_pool_pings_only_idle_connections_and_replaces_dropped_ones(
    pg_database: str, postgres_admin_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(Settings(database_url=pg_database, var_dir=tmp_path, db_ping_after_idle_s=0.3))
    pings: list[int] = []
    real_ping = engine.dialect.do_ping
    monkeypatch.setattr(engine.dialect, "do_ping", lambda conn: (pings.append(1), real_ping(conn))[1])
    try:
        first = _backend_pid(engine)
        assert _backend_pid(engine) == first and not pings  # in steady use: no ping per checkout
        _terminate(postgres_admin_url, first)  # the server drops the idle connection
        time.sleep(0.5)
        assert _backend_pid(engine) != first  # pinged, found dead, replaced: the caller sees nothing
        assert pings == [1]
    finally:
        engine.dispose()


def test_fast_create_on_a_dropped_connection_fails_whole_then_recovers(
    pg_database: str, postgres_admin_url: str, tmp_path: Path
) -> None:
    upgrade(pg_database)
    engine = make_engine(Settings(database_url=pg_database, var_dir=tmp_path, db_ping_after_idle_s=3600))
    try:
        with Session(engine) as s:
            s.add(AcceleratorProfile(name="sa32", rows=32, cols=32, fmt="int8", bypass=True))
            s.commit()
            prof = get_profile(s, "sa32")
        assert isinstance(prof, ProfileInfo)
        doc = {"chip_id": "c1", "accelerator": "sa32", "array": {"rows": 32, "cols": 32}, "faults": []}
        p = svc.prepare(None, doc, profiles={"sa32": prof})
        _terminate(postgres_admin_url, _backend_pid(engine))  # dropped while it looks fresh: no ping
        with pytest.raises(DBAPIError):
            svc.create_fast(engine, p)
        with Session(engine) as s:  # nothing was written, and the pool works again
            assert s.scalar(select(func.count()).select_from(Chip)) == 0
        created = svc.create_fast(engine, p)
        assert created is not None and created[0].status == "created" and created[1] is None  # no late-assignment job
        assert svc.create_fast(engine, p) is None  # exists now: the caller takes the general path
        with Session(engine) as s:
            assert s.scalar(select(func.count()).select_from(ChipRevision)) == 1
    finally:
        engine.dispose()
