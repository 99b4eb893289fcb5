"""The single-POST ingest path's shortcuts keep its behaviour: late-chip hook, auth cache, validation."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import create_engine, select, update
from sqlalchemy.orm import Session

from app.db.models import AcceleratorProfile, BaseModel, Plan

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
            bm = BaseModel(name=f"bm-{uid}", architecture="lenet5", dataset="mnist", accelerator_id=prof)
            s.add(bm)
            s.flush()
            plan = Plan(base_model_id=bm.id, status="executed", constraint={"max_accuracy_drop": 0.01})
            s.add(plan)
            s.commit()
            plan_id = plan.id
        try:
            yield
        finally:
            with Session(engine) as s:
                s.execute(update(Plan).where(Plan.id == plan_id).values(status="failed"))
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
