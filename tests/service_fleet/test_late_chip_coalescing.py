"""Issue 19: late chips coalesce into one pending assignment job per accelerator.

A real executed plan (a base model trained on a worker, fault-free chips that it serves as
they are), then a stream of single POSTs with the worker stopped: one queued job holds them
all, concurrent POSTs included (PostgreSQL: two API processes racing on the upsert). With the
worker back, that one job serves every chip; then chips posted while the worker runs are all
served too, whichever job each joined.
"""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from app.db.models import Chip, Job

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N = 16


@pytest.fixture(scope="module", params=["embedded", "postgres"])
def executed(request: pytest.FixtureRequest, ff_tools: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    env = {"FAULTFLEET_API_WORKERS": "2"} if request.param == "postgres" else {}
    with ff_tools.running_service(request.param, tmp_path_factory.mktemp(f"late-{request.param}"), **env) as svc:
        accel = "late8"
        with svc.client() as c:
            body = {"name": accel, "rows": 8, "cols": 8, "fmt": "int8", "bypass": True}
            assert c.post("/api/v1/accelerators", json=body).status_code == 201
            maps = [_clean(f"early-{i}", accel) for i in range(3)]
            body = "".join(json.dumps(m) + "\n" for m in maps)
            r = c.post("/api/v1/chips/bulk", content=body, headers={"Content-Type": "application/x-ndjson"})
            assert r.status_code == 200 and r.json()["created"] == 3, r.text
            reg = {"name": "m", "architecture": "mlp", "dataset": "digits", "accelerator": accel}
            r = c.post("/api/v1/models", json={**reg, "train": True, "epochs": 3})
            assert r.status_code == 202, r.text
            assert svc.wait_job(r.json()["job"]["id"], timeout=300)["state"] == "succeeded"
            plan = {
                "model": "m",
                "constraint": {"max_drop": 0.1},
                "chips": {"ids": [m["chip_id"] for m in maps]},
                "resilience_map": "off",
                "robust_base": "off",
            }
            r = c.post("/api/v1/plans", json=plan)
            assert r.status_code == 202, r.text
            assert svc.wait_job(r.json()["job"]["id"], timeout=300)["state"] == "succeeded"
            r = c.post(f"/api/v1/plans/{r.json()['plan']['id']}/execute")
            assert r.status_code == 202, r.text
            assert svc.wait_job(r.json()["id"], timeout=300)["state"] == "succeeded"
        yield svc, accel


def _clean(chip_id: str, accel: str) -> dict[str, Any]:
    """A fault-free chip: the base model serves it as it is (needs_nothing), deterministically."""
    return {"chip_id": chip_id, "accelerator": accel, "array": {"rows": 8, "cols": 8}, "faults": []}


def _assign_jobs(database_url: str) -> list[Job]:
    engine = create_engine(database_url)
    try:
        with Session(engine) as s:
            return list(s.scalars(select(Job).where(Job.kind == "assign_chip")))
    finally:
        engine.dispose()


def _chip_pks(database_url: str, chip_ids: list[str]) -> set[int]:
    engine = create_engine(database_url)
    try:
        with Session(engine) as s:
            return set(s.scalars(select(Chip.id).where(Chip.chip_id.in_(chip_ids))))
    finally:
        engine.dispose()


def _served(svc: Any, chip_ids: list[str]) -> None:
    with svc.client() as c:
        for cid in chip_ids:
            r = c.get(f"/api/v1/chips/{cid}/model", params={"format": "manifest"})
            assert r.status_code == 200, r.text
            assert r.json()["source"] == "late" and r.json()["status"] == "needs_nothing", r.json()


def test_single_posts_share_one_pending_job_that_serves_them_all(executed: Any, ff_tools: Any) -> None:
    svc, accel = executed
    tag = uuid.uuid4().hex[:6]
    before = {j.id for j in _assign_jobs(svc.database_url)}
    assert svc.worker is not None
    svc.worker.stop()  # nothing takes the job while the chips arrive
    svc.worker = None
    try:
        maps = [_clean(f"late-{tag}-{i}", accel) for i in range(N)]
        with svc.client() as c, ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda m: c.post("/api/v1/chips", json=m), maps))
            assert [r.status_code for r in answers] == [201] * N, [r.text for r in answers]
            # a bulk joins the same job
            extra = [_clean(f"late-{tag}-b{i}", accel) for i in range(3)]
            body = "".join(json.dumps(m) + "\n" for m in extra)
            bulk = c.post("/api/v1/chips/bulk", content=body, headers={"Content-Type": "application/x-ndjson"})
            assert bulk.status_code == 200 and bulk.json()["created"] == 3, bulk.text
        new = [j for j in _assign_jobs(svc.database_url) if j.id not in before]
        assert len(new) == 1, [(j.id, j.state, j.params) for j in new]  # one job, not N + 1
        job = new[0]
        assert job.state == "queued" and job.subject and job.subject.startswith("late-chips:")
        assert {r.json()["assignment_job"] for r in answers} == {job.id}
        assert bulk.json()["assignment_jobs"] == [job.id]
        ids = [m["chip_id"] for m in maps + extra]
        assert set(job.params["chip_pks"]) == _chip_pks(svc.database_url, ids)
    finally:
        svc.start_worker()
    assert svc.wait_job(job.id, timeout=300)["state"] == "succeeded"
    _served(svc, ids)


def test_chips_posted_while_the_worker_runs_are_all_served(executed: Any, ff_tools: Any) -> None:
    svc, accel = executed
    tag = uuid.uuid4().hex[:6]
    before = {j.id for j in _assign_jobs(svc.database_url)}
    maps = [_clean(f"live-{tag}-{i}", accel) for i in range(N)]
    with svc.client() as c:
        job_ids = set()
        for m in maps:
            r = c.post("/api/v1/chips", json=m)
            assert r.status_code == 201, r.text
            job_ids.add(r.json()["assignment_job"])
    new = {j.id for j in _assign_jobs(svc.database_url)} - before
    assert job_ids == new and len(new) <= N
    for job_id in new:
        assert svc.wait_job(job_id, timeout=300)["state"] == "succeeded"
    jobs = [j for j in _assign_jobs(svc.database_url) if j.id in new]
    ids = [m["chip_id"] for m in maps]
    assert {pk for j in jobs for pk in j.params["chip_pks"]} == _chip_pks(svc.database_url, ids)
    _served(svc, ids)
