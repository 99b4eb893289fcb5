"""Issue 19 item 2 (and 18's worker health): a real Redis broker of the test's own, stopped and started.

While the broker is down: job submission answers 503 quickly and writes nothing, ingestion keeps
working, /readyz says the broker is unreachable. When it is back (empty: no persistence, so
every message in it was lost) nothing queued is lost: the workers' sweep sends the jobs again.
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, func, select

from app.db.models import Job
from tests.faults import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_broker_down_and_back(pg_database: str, tmp_path: Path, ff_tools: Any) -> None:
    if not RedisServer.available():
        pytest.skip("redis-server is not installed")
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    tag = uuid.uuid4().hex[:8]
    env = ff_tools.base_env(
        FAULTFLEET_DATABASE_URL=pg_database,
        FAULTFLEET_BROKER_URL=redis.url,
        FAULTFLEET_QUEUE=f"ffbroker-{tag}",
        FAULTFLEET_VAR_DIR=str(tmp_path / "var"),
        FAULTFLEET_WORKER_STALE_AFTER_S="3",
        FAULTFLEET_BROKER_RETRY_AFTER_S="2",
        FAULTFLEET_JOB_REQUEUE_QUEUED_AFTER_S="600",  # only the broker-came-back re-send may save the jobs
    )
    assert ff_tools.run_cli(["migrate"], env, tmp_path).returncode == 0
    res = ff_tools.run_cli(["keys", "create", "--scope", "admin"], env, tmp_path)
    assert res.returncode == 0, res.stderr
    svc = ff_tools.Service("broker", env, tmp_path, "", res.stdout.strip(), pg_database)
    engine = create_engine(pg_database)
    try:
        svc.start_api()
        svc.start_worker(concurrency=1)
        c = svc.client(timeout=60)
        profile = f"bd-{tag}"
        assert c.post("/api/v1/accelerators", json={"name": profile, "rows": 8, "cols": 8, "fmt": "int8"}).is_success
        for i in range(12):
            fm = ff_tools.random_fault_map(f"bd-{tag}-{i}", profile, rows=8, cols=8, rate=0.1)
            assert c.post("/api/v1/chips", json=fm).status_code == 201
        ready = c.get("/readyz").json()
        assert ready["checks"] == {"database": "ok", "broker": "ok"}
        assert ready["workers"]["status"] == "ok" and ready["workers"]["alive"] == 1, ready

        # A slow job occupies the only worker slot; two more wait in Redis.
        stats = {"accelerator": profile, "batch_size": 1, "throttle_s": 0.5}
        slow = c.post("/api/v1/fleet/stats", json=stats)
        assert slow.status_code == 202, slow.text
        svc.wait_job(slow.json()["id"], timeout=30, states=("running",))
        waiting = [c.post("/api/v1/fleet/stats", json={"accelerator": profile}).json()["id"] for _ in range(2)]

        redis.stop()  # the broker dies and takes its messages with it
        with engine.connect() as conn:
            jobs_before = conn.execute(select(func.count()).select_from(Job)).scalar_one()
        t0 = time.monotonic()
        refused = c.post("/api/v1/fleet/stats", json={"accelerator": profile})
        took = time.monotonic() - t0
        assert refused.status_code == 503, refused.text
        assert refused.json()["detail"].startswith("job broker unavailable")
        assert int(refused.headers["retry-after"]) == 2
        assert took < 8, f"a refused submission took {took:.1f} s"
        refused = c.post("/api/v1/fleet/stats", json={"accelerator": profile})  # known down: refused at once
        assert refused.status_code == 503
        with engine.connect() as conn:  # nothing was written for the refused ones
            assert conn.execute(select(func.count()).select_from(Job)).scalar_one() == jobs_before

        def ingest(i: int) -> tuple[int, float]:
            fm = ff_tools.random_fault_map(f"bd-{tag}-down-{i}", profile, rows=8, cols=8, rate=0.1)
            t = time.monotonic()
            with httpx.Client(base_url=svc.base_url, headers={"X-API-Key": svc.admin_key}, timeout=60) as cc:
                code = cc.post("/api/v1/chips", json=fm).status_code
            return code, time.monotonic() - t

        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(ingest, range(60)))
        assert [code for code, _ in answers] == [201] * 60
        assert max(t for _, t in answers) < 8, "ingestion stalled while the broker was down"
        assert c.get("/api/v1/accelerators").status_code == 200
        ready = c.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["database"] == "ok"
        assert ready.json()["checks"]["broker"].startswith("unreachable")

        time.sleep(1.5)  # the worker's sweep sees the broker down (sweep interval 0.5 s)
        redis.start()  # back, empty
        for job_id in [slow.json()["id"], *waiting]:
            job = svc.wait_job(job_id, timeout=60)
            assert job["state"] == "succeeded", job
        assert c.get("/readyz").status_code == 200
        accepted = c.post("/api/v1/fleet/stats", json={"accelerator": profile})
        assert accepted.status_code == 202
        assert svc.wait_job(accepted.json()["id"], timeout=30)["state"] == "succeeded"

        # the only worker stops: /readyz stays ready (the API works without it) and says so
        assert svc.worker is not None
        svc.worker.stop()
        svc.worker = None
        workers = c.get("/readyz").json()["workers"]
        assert workers["alive"] == 0 and workers["status"].startswith("no worker seen"), workers
    finally:
        svc.stop()
        engine.dispose()
        redis.stop()
