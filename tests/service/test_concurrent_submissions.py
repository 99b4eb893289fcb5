"""Issue 19 item 4: concurrent check-then-insert requests on PostgreSQL create one record, not two.

A real API on a fresh PostgreSQL database and a queue no worker reads (the jobs stay queued, so
a finished execution cannot make a second one legitimate); 20 requests at once, several rounds.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from app.db.models import Job, ModelRecord, PlanRecord
from tests.rows import base_model_row

pytestmark = pytest.mark.integration


def _at_once(n: int, send: Any) -> list[httpx.Response]:
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: send(), range(n)))


def test_concurrent_executes_make_one_execution(api_on_fresh_pg: Any) -> None:
    svc = api_on_fresh_pg
    engine = create_engine(svc.database_url)
    try:
        with Session(engine) as s:
            bm = base_model_row(s, profile="p")
            plans = []
            for _ in range(5):  # planned (a document), not executed yet
                plan = PlanRecord(base_model_id=bm.id, status="planned", constraint={}, document={"chips": []})
                s.add(plan)
                plans.append(plan)
            s.commit()
            plan_ids = [p.id for p in plans]
        headers = {"X-API-Key": svc.admin_key}
        for plan_id in plan_ids:

            def execute(plan_id: int = plan_id) -> httpx.Response:
                return httpx.post(f"{svc.base_url}/api/v1/plans/{plan_id}/execute", headers=headers, timeout=60)

            answers = _at_once(20, execute)
            assert [r.status_code for r in answers] == [202] * 20, [r.text for r in answers if r.status_code != 202]
            assert len({r.json()["id"] for r in answers}) == 1  # every request got the one execution
            with Session(engine) as s:
                n = s.scalar(
                    select(func.count())
                    .select_from(Job)
                    .where(Job.subject == f"plan:{plan_id}", Job.kind == "execute_plan")
                )
            assert n == 1, f"plan {plan_id}: {n} execute jobs"
    finally:
        engine.dispose()


def test_concurrent_model_registrations_make_one_model(api_on_fresh_pg: Any) -> None:
    svc = api_on_fresh_pg
    headers = {"X-API-Key": svc.admin_key}
    r = httpx.post(
        f"{svc.base_url}/api/v1/accelerators",
        json={"name": "p", "rows": 8, "cols": 8, "fmt": "int8"},
        headers=headers,
        timeout=30,
    )
    assert r.status_code == 201, r.text
    for i in range(3):
        body = {"name": f"m{i}", "architecture": "mlp", "dataset": "digits", "accelerator": "p", "train": True}

        def register(body: dict[str, Any] = body) -> httpx.Response:
            return httpx.post(f"{svc.base_url}/api/v1/models", json=body, headers=headers, timeout=120)

        answers = _at_once(10, register)
        codes = sorted(r.status_code for r in answers)
        assert codes == [202] + [409] * 9, [r.text for r in answers]
        assert all("already exists" in r.json()["detail"] for r in answers if r.status_code == 409)
    engine = create_engine(svc.database_url)
    try:
        with Session(engine) as s:
            assert s.scalar(select(func.count()).select_from(ModelRecord)) == 3
            assert s.scalar(select(func.count()).select_from(Job).where(Job.kind == "register_model")) == 3
    finally:
        engine.dispose()
