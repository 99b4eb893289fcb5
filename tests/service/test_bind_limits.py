"""Issue 19 item 7: PostgreSQL's 65,535 bind-parameter limit, at 70,000 chips.

A bulk of 70,000 new chips for an accelerator with an executed plan stores them together with
their late-assignment job (the accelerator's one pending job, which each chunk joins in its own
transaction), and POST /plans takes
70,000 chip ids. A real API on PostgreSQL without a worker, so the jobs stay as created.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from app.db.models import AcceleratorProfile, Job, ModelRecord, PlanRecord

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N = 70_000


def test_70k_chips_with_an_executed_plan_and_a_70k_id_plan(api_on_fresh_pg: Any) -> None:
    svc = api_on_fresh_pg
    c = httpx.Client(base_url=svc.base_url, headers={"X-API-Key": svc.admin_key}, timeout=600)
    assert c.post("/api/v1/accelerators", json={"name": "p", "rows": 4, "cols": 4, "fmt": "int8"}).status_code == 201
    engine = create_engine(svc.database_url)
    try:
        with Session(engine) as s:
            prof = s.scalar(select(AcceleratorProfile.id).where(AcceleratorProfile.name == "p"))
            assert prof is not None
            bm = ModelRecord(name="m", architecture="mlp", dataset="digits", accelerator_id=prof, status="ready")
            s.add(bm)
            s.flush()
            s.add(PlanRecord(base_model_id=bm.id, status="executed", constraint={}, document={"chips": []}))
            s.commit()

        ids = [f"b{i:05d}" for i in range(N)]
        body = "\n".join(
            json.dumps({"chip_id": cid, "accelerator": "p", "array": {"rows": 4, "cols": 4}, "faults": []})
            for cid in ids
        )
        r = c.post("/api/v1/chips/bulk", content=body, headers={"content-type": "application/x-ndjson"})
        assert r.status_code == 200, r.text[:2000]
        res = r.json()
        assert res["created"] == N and res["rejected"] == 0
        with Session(engine) as s:
            jobs = list(s.scalars(select(Job).where(Job.kind == "assign_chip")))
        assert len(jobs) == 1 and [j.id for j in jobs] == res["assignment_jobs"]  # no worker: it stays pending
        assert sum(len(j.params["chip_pks"]) for j in jobs) == N  # every new chip is in a job
        assert len({pk for j in jobs for pk in j.params["chip_pks"]}) == N

        again = c.post("/api/v1/chips/bulk", content=body, headers={"content-type": "application/x-ndjson"})
        assert again.status_code == 200 and again.json()["unchanged"] == N
        assert "assignment_job" not in again.json()  # nothing new: no job

        r = c.post("/api/v1/plans", json={"model": "m", "chips": {"ids": ids}, "constraint": {"max_drop": 0.05}})
        assert r.status_code == 202, r.text[:2000]
        r = c.post(
            "/api/v1/plans", json={"model": "m", "chips": {"ids": [*ids, "nope"]}, "constraint": {"max_drop": 0.05}}
        )
        assert r.status_code == 422 and "nope" in r.json()["detail"]
    finally:
        engine.dispose()
        c.close()
