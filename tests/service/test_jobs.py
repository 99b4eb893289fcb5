"""Jobs on real Celery workers: fleet statistics, progress, cancellation, and a SIGKILLed worker."""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import pytest

pytestmark = pytest.mark.integration


def _ingest(service: Any, maps: list[dict[str, Any]]) -> None:
    body = "\n".join(json.dumps(m) for m in maps).encode()
    with service.client() as c:
        res = c.post("/api/v1/chips/bulk", content=body).json()
    assert res["created"] + res["unchanged"] == len(maps), res


def _start_stats(service: Any, **params: Any) -> str:
    with service.client() as c:
        r = c.post("/api/v1/fleet/stats", json=params)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["state"] == "queued" and job["progress"]["fraction"] == 0.0
    return str(job["id"])


def test_fleet_stats_job(service: Any, accelerator: str, uid: str, make_map: Any) -> None:
    maps = [make_map(f"S{uid}-{i}", accelerator, rate=0.01 * (1 + i % 3), lot=f"LS{uid}") for i in range(60)]
    _ingest(service, maps)
    job_id = _start_stats(service, accelerator=accelerator, batch_size=7)
    job = service.wait_job(job_id)
    assert job["state"] == "succeeded", job
    res = job["result"]
    assert res["chips"] == 60 and res["invalid_maps"] == []
    assert res["faults"] == sum(len(m["faults"]) for m in maps)
    sites = Counter(f["site"] for m in maps for f in m["faults"])
    assert res["faults_by_site"] == dict(sites)
    rates = [len(m["faults"]) / 1024 for m in maps]
    assert res["fault_rate"]["mean"] == pytest.approx(sum(rates) / 60)
    assert res["fault_rate"]["max"] == pytest.approx(max(rates))
    assert res["chips_by_lot"] == {f"LS{uid}": 60}
    heat = res["profiles"][accelerator]["faulty_pe_counts"]
    assert sum(map(sum, heat)) == sum(len({(f["row"], f["col"]) for f in m["faults"]}) for m in maps)
    assert job["progress"] == {"fraction": 1.0, "message": "done"}
    assert job["attempts"] == 1 and job["started_at"] and job["finished_at"]


def test_job_not_found_and_finished_job_cannot_be_cancelled(service: Any, accelerator: str) -> None:
    with service.client() as c:
        r = c.get("/api/v1/jobs/doesnotexist")
        assert r.status_code == 404 and r.json()["errors"][0]["loc"] == ["path", "job_id"]
        assert c.delete("/api/v1/jobs/doesnotexist").status_code == 404
    job_id = _start_stats(service, accelerator=accelerator)
    assert service.wait_job(job_id)["state"] == "succeeded"
    with service.client() as c:
        r = c.delete(f"/api/v1/jobs/{job_id}")
        assert r.status_code == 409 and "succeeded" in r.json()["detail"]
        r = c.post("/api/v1/fleet/stats", json={"batch_size": 0})
        assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "batch_size"]


def _wait_progress(service: Any, job_id: str, at_least: float, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    with service.client() as c:
        while True:
            job = c.get(f"/api/v1/jobs/{job_id}").json()
            if job["state"] == "running" and job["progress"]["fraction"] >= at_least:
                return dict(job)
            assert job["state"] in ("queued", "running"), job
            assert time.monotonic() < deadline, job
            time.sleep(0.05)


def test_cancel_running_job(service: Any, accelerator: str, uid: str, make_map: Any) -> None:
    _ingest(service, [make_map(f"C{uid}-{i}", accelerator) for i in range(40)])
    job_id = _start_stats(service, accelerator=accelerator, batch_size=2, throttle_s=0.3)
    _wait_progress(service, job_id, 0.05)
    with service.client() as c:
        r = c.delete(f"/api/v1/jobs/{job_id}")
        assert r.status_code == 200 and r.json()["state"] == "cancelled"
    time.sleep(1.5)  # the worker notices at its next report and must not overwrite the state
    with service.client() as c:
        job = c.get(f"/api/v1/jobs/{job_id}").json()
    assert job["state"] == "cancelled" and job["result"] is None and job["progress"]["fraction"] < 1.0


def test_job_survives_sigkilled_worker(service: Any, accelerator: str, uid: str, make_map: Any) -> None:
    """SIGKILL the worker mid-job; a new worker's recovery sweep re-enqueues it and it resumes
    from its last checkpoint: every chip counted exactly once, nothing lost or duplicated."""
    n = 120
    _ingest(service, [make_map(f"K{uid}-{i}", accelerator, lot=f"LK{uid}") for i in range(n)])
    job_id = _start_stats(service, lot=f"LK{uid}", batch_size=4, throttle_s=0.15)
    before = _wait_progress(service, job_id, 0.25)
    service.kill_worker()
    with service.client() as c:
        time.sleep(0.5)
        assert c.get(f"/api/v1/jobs/{job_id}").json()["state"] == "running"  # nobody knows yet
    service.start_worker()
    job = service.wait_job(job_id, timeout=90)
    assert job["state"] == "succeeded", job
    res = job["result"]
    assert res["chips"] == n and res["chips_by_lot"] == {f"LK{uid}": n}
    assert job["attempts"] == 2
    assert res["run"]["attempt"] == 2
    # resumed from a checkpoint, not from zero
    assert res["run"]["resumed_after_chips"] >= before["progress"]["fraction"] * n - 4 > 0


def test_worker_restarted_under_a_shared_nodename_leaves_live_jobs_alone(
    service: Any, accelerator: str, uid: str, make_map: Any, ff_tools: Any
) -> None:
    """Issue 19 item 5: a worker starting under the node name of a live one (a restart racing its
    predecessor, or two machines sharing a name) must not take back the jobs live processes run.
    The old sweep re-enqueued every running job under its node name at start: a second attempt."""
    _ingest(service, [make_map(f"N{uid}-{i}", accelerator, lot=f"LN{uid}") for i in range(30)])
    node = f"shared-{uid}@%h"
    argv = [ff_tools.PY, "-m", "app.cli", "worker", "--concurrency", "1", "--hostname", node]
    procs = []
    try:
        for i in range(2):
            proc = ff_tools.start_proc(argv, service.env, service.workdir, f"shared-{uid}-{i}")
            procs.append(proc)
            deadline = time.monotonic() + 60
            while "ready." not in proc.log_tail(100_000):
                assert proc.alive() and time.monotonic() < deadline, proc.log_tail()
                time.sleep(0.1)
            if i == 0:
                service.kill_worker()  # the shared-name worker is the only one left to run the job
                job_id = _start_stats(service, lot=f"LN{uid}", batch_size=2, throttle_s=0.2)
                running = _wait_progress(service, job_id, 0.1)
                assert running["attempts"] == 1
        time.sleep(2)  # several sweeps of the second worker (interval 0.5 s)
        job = service.wait_job(job_id, timeout=90)
        assert job["state"] == "succeeded", job
        assert job["attempts"] == 1 and job["result"]["chips"] == 30
    finally:
        for proc in procs:
            proc.stop()
        if service.worker is None:
            service.start_worker()
