#!/usr/bin/env python3
"""A bounded soak on loopback (issue 19): ingestion at a steady rate while a plan executes, a
worker SIGKILLed and restarted, and a Redis of the soak's own stopped and started.

Everything is the soak's own: a PostgreSQL database (dropped after), a redis-server on a free
port (no persistence, so a stop loses every message in it), the API and a worker. It registers
an accelerator and a small base model, posts a fleet, plans it, and executes the plan. From the
start of the execution it POSTs single fault maps at `--rate` per second until the execution has
ended and every fault was injected:

    +kill_at s      SIGKILL the worker's whole process group; restart it (same node name) 1 s later
    +redis_at s     stop the broker; start it again (empty) `--redis-down-s` later

It prints one JSON document: requests served, errors by status, ingestion latency (p50/p99, all
and while a job ran), jobs completed, and what was lost: acknowledged chips missing or different
in the database, jobs not finished at the end, artifacts whose bytes are missing or corrupt.
Goal (issue 19): 0 lost, no 5xx, p99 < 100 ms for ingestion while a job runs. A benchmark
reports figures; it never passes or fails on them.

    .venv/bin/python bench/soak.py                 # about 3-6 minutes on a small machine
    .venv/bin/python bench/soak.py --rate 50 --out soak.json
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.faults import RedisServer  # noqa: E402

TERMINAL = ("succeeded", "failed", "cancelled")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pct(vals: list[float], q: float) -> float | None:
    if not vals:
        return None
    s = sorted(vals)
    return round(s[min(len(s) - 1, int(q * len(s)))] * 1000, 2)


class Proc:
    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path, name: str) -> None:
        self.log = cwd / f"{name}.log"
        with self.log.open("ab") as fh:
            self.popen = subprocess.Popen(
                argv, env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
            )

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=30)

    def stop(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


class Ingest:
    """POSTs single fault maps at a fixed rate from a scheduler thread (a pool sends them, so a slow
    answer does not delay the next request: no coordinated omission)."""

    def __init__(self, url: str, key: str, accelerator: str, rows: int, cols: int, rate: float) -> None:
        self.url, self.key, self.accelerator = url, key, accelerator
        self.rows, self.cols, self.rate = rows, cols, rate
        self.samples: list[tuple[float, float, int]] = []  # (sent at, seconds, status; 0 = no answer)
        self.acked: dict[str, str] = {}  # chip id -> content hash of the map acknowledged (201/200)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._local = threading.local()
        self._rnd = random.Random(1)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _client(self) -> httpx.Client:
        c = getattr(self._local, "client", None)
        if c is None:
            c = httpx.Client(base_url=self.url, headers={"X-API-Key": self.key}, timeout=60)
            self._local.client = c
        return c

    def _map(self, i: int) -> dict[str, Any]:
        rnd = random.Random(i)
        pes = rnd.sample(range(self.rows * self.cols), 3)
        faults = [{"row": p // self.cols, "col": p % self.cols, "site": "weight", "bit": 6, "stuck": 1} for p in pes]
        return {
            "chip_id": f"soak-{i:07d}",
            "accelerator": self.accelerator,
            "array": {"rows": self.rows, "cols": self.cols},
            "faults": faults,
        }

    def _send(self, i: int) -> None:
        fm = self._map(i)
        t0 = time.monotonic()
        content_hash = ""
        try:
            r = self._client().post("/api/v1/chips", json=fm)
            code = r.status_code
            if code in (200, 201):
                content_hash = r.json()["content_hash"]
        except httpx.HTTPError:
            code = 0
        took = time.monotonic() - t0
        with self._lock:
            self.samples.append((t0, took, code))
            if content_hash:
                self.acked[fm["chip_id"]] = content_hash

    def _run(self) -> None:
        with ThreadPoolExecutor(16) as pool:
            start = time.monotonic()
            i = 0
            while not self._stop.is_set():
                pool.submit(self._send, i)
                i += 1
                wait = start + i / self.rate - time.monotonic()
                if wait > 0:
                    self._stop.wait(wait)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pg-admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    ap.add_argument("--rate", type=float, default=20.0, help="single POST /chips per second")
    ap.add_argument("--chips", type=int, default=20, help="chips in the plan")
    ap.add_argument("--defects", type=float, default=4.0, help="mean defects a die of the plan's (harsh) fleet")
    ap.add_argument("--kill-at", type=float, default=8.0, help="s after the execution starts: SIGKILL the worker")
    ap.add_argument("--redis-at", type=float, default=25.0, help="s after the execution starts: stop Redis")
    ap.add_argument("--redis-down-s", type=float, default=6.0)
    ap.add_argument("--max-seconds", type=float, default=900.0, help="give up on the execution after this long")
    ap.add_argument(
        "--same-profile",
        action="store_true",
        help="ingest chips of the plan's own profile (after the execution each starts a late-assignment job)",
    )
    ap.add_argument("--warmup-s", type=float, default=5.0, help="ingestion before the execution starts")
    ap.add_argument("--settle-s", type=float, default=180.0, help="most seconds to wait for open jobs at the end")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import psycopg
    from sqlalchemy import create_engine, func, select
    from sqlalchemy.orm import Session

    from app.db.models import Artifact, Chip, Job

    tmp = Path(tempfile.mkdtemp(prefix="ff-soak-"))
    libpq = args.pg_admin_url.replace("postgresql+psycopg://", "postgresql://")
    dbname = f"ff_soak_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(libpq, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{dbname}"')
    db_url = args.pg_admin_url.rpartition("/")[0] + f"/{dbname}"
    redis = RedisServer(tmp / "redis")
    key = f"soak-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAULTFLEET_")}
    env.update(
        FAULTFLEET_DATABASE_URL=db_url,
        FAULTFLEET_BROKER_URL=redis.url,
        FAULTFLEET_VAR_DIR=str(tmp / "var"),
        FAULTFLEET_API_KEYS=f'["admin:{key}"]',
        FAULTFLEET_JOB_HEARTBEAT_S="1",
        FAULTFLEET_JOB_STALE_AFTER_S="10",
        FAULTFLEET_JOB_SWEEP_INTERVAL_S="2",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(ROOT),
    )
    worker_argv = [sys.executable, "-m", "app.cli", "worker", "--concurrency", "2", "--hostname", "soak@%h"]
    api: Proc | None = None
    worker: Proc | None = None
    events: list[dict[str, Any]] = []
    report: dict[str, Any] = {}
    t_origin = time.monotonic()

    def event(what: str) -> None:
        events.append({"t_s": round(time.monotonic() - t_origin, 1), "event": what})
        print(f"[soak] {events[-1]['t_s']:7.1f} s  {what}", file=sys.stderr, flush=True)

    engine = create_engine(db_url)
    try:
        redis.start()
        subprocess.run([sys.executable, "-m", "app.cli", "migrate"], env=env, cwd=tmp, check=True, capture_output=True)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        api = Proc([sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--no-access-log"], env, tmp, "api")
        worker = Proc(worker_argv, env, tmp, "worker1")
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                ready = httpx.get(f"{url}/readyz", timeout=2).json()
                if ready.get("status") == "ready" and ready.get("workers", {}).get("alive"):
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"service not ready: {api.log.read_text()[-2000:]}")
            time.sleep(0.2)
        event("service ready")

        c = httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=120)

        def wait_job(job_id: str, timeout: float) -> dict[str, Any]:
            end = time.monotonic() + timeout
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    job = c.get(f"/api/v1/jobs/{job_id}").json()
                    if job["state"] in TERMINAL:
                        return dict(job)
                if time.monotonic() > end:
                    raise TimeoutError(f"job {job_id} not finished in {timeout} s")
                time.sleep(0.5)

        accel, rows, cols = "soak16", 16, 16
        c.post(
            "/api/v1/accelerators", json={"name": accel, "rows": rows, "cols": cols, "fmt": "int8", "bypass": True}
        ).raise_for_status()
        from accelerator import ArrayConfig
        from planner import FleetSpec, generate_fleet
        from planner.synthetic_fleet import FaultMix

        # harsh enough that most chips fail screening: the execution retrains while ingestion runs
        harsh = FaultMix(sites={"pe": 0.15, "weight": 0.3, "act": 0.25, "psum": 0.3}, psum_high_bias=0.5)
        spec = FleetSpec(array=ArrayConfig(rows, cols), accelerator=accel, defects_per_die=args.defects, mix=harsh)
        fleet = [m.to_dict() for m in generate_fleet(args.chips, 7, spec)]
        body = "".join(json.dumps(m) + "\n" for m in fleet)
        c.post("/api/v1/chips/bulk", content=body, headers={"content-type": "application/x-ndjson"}).raise_for_status()
        model = {
            "name": "soak-mlp",
            "architecture": "mlp",
            "dataset": "digits",
            "accelerator": accel,
            "train": True,
            "epochs": 5,
        }
        job = c.post("/api/v1/models", json=model).json()["job"]
        assert wait_job(job["id"], args.max_seconds)["state"] == "succeeded", "base model failed"
        event("base model ready")
        plan_body = {
            "model": "soak-mlp",
            "constraint": {"max_drop": 0.03},
            "chips": {"ids": [m["chip_id"] for m in fleet]},
            "resilience": {"rates": [0.01, 0.03, 0.06], "epochs": [0, 1, 2], "samples": 1},
            # groups retrained from the base (no robust base to serve them first, no map to measure)
            "robust_base": "off",
            "resilience_map": "off",
            "max_group_size": 2,
        }
        accepted = c.post("/api/v1/plans", json=plan_body).json()
        plan_id = accepted["plan"]["id"]
        planned = wait_job(accepted["job"]["id"], args.max_seconds)
        assert planned["state"] == "succeeded", f"planning failed: {planned}"
        event(f"plan {plan_id} planned")

        # Ingestion goes to a second profile of the same array (a second product line) by default: a
        # chip of the executed plan's own profile starts a late-assignment job each (--same-profile).
        line2 = accel if args.same_profile else f"{accel}-line2"
        if line2 != accel:
            prof2 = {"name": line2, "rows": rows, "cols": cols, "fmt": "int8", "bypass": True}
            c.post("/api/v1/accelerators", json=prof2).raise_for_status()
        ingest = Ingest(url, key, line2, rows, cols, args.rate)
        ingest.start()
        event("ingestion started (warm-up: new connections, caches)")
        time.sleep(args.warmup_s)
        execute = c.post(f"/api/v1/plans/{plan_id}/execute").json()
        t_exec = time.monotonic()
        event("execution started")
        killed = redis_stopped = redis_started = False
        exec_state = "queued"
        job_windows: list[tuple[float, float]] = []
        while True:
            now = time.monotonic() - t_exec
            if not killed and now >= args.kill_at:
                worker.kill()
                event("worker SIGKILLed")
                time.sleep(1)
                worker = Proc(worker_argv, env, tmp, "worker2")
                event("worker restarted (same node name)")
                killed = True
            if not redis_stopped and now >= args.redis_at:
                redis.stop()
                event("redis stopped")
                redis_stopped = True
                t_redis = time.monotonic()
            if redis_stopped and not redis_started and time.monotonic() - t_redis >= args.redis_down_s:
                redis.start()
                event("redis started (empty)")
                redis_started = True
            if exec_state not in TERMINAL:
                with contextlib.suppress(httpx.HTTPError):
                    exec_state = c.get(f"/api/v1/jobs/{execute['id']}").json()["state"]
                    if exec_state in TERMINAL:
                        job_windows.append((t_exec, time.monotonic()))
                        event(f"execution {exec_state}")
            if exec_state in TERMINAL and killed and redis_started:
                break
            if now > args.max_seconds:
                event("execution not finished in time")
                job_windows.append((t_exec, time.monotonic()))
                break
            time.sleep(0.2)
        ingest.stop()
        event("ingestion stopped")

        # every job must end: wait for the stragglers (late-chip jobs of chips posted at the end)
        end = time.monotonic() + args.settle_s
        while time.monotonic() < end:
            with Session(engine) as s:
                open_jobs = s.scalar(select(func.count()).select_from(Job).where(Job.state.not_in(TERMINAL)))
            if not open_jobs:
                break
            time.sleep(1)
        event("jobs settled" if not open_jobs else f"{open_jobs} jobs still open")

        with Session(engine) as s:
            jobs = Counter(s.scalars(select(Job.state)))
            jobs_by_kind = Counter(f"{k}:{st}" for k, st in s.execute(select(Job.kind, Job.state)).tuples())
            stored = {cid: h for cid, h in s.execute(select(Chip.chip_id, Chip.content_hash)).tuples()}
            artifacts = list(s.execute(select(Artifact.sha256, Artifact.location)).tuples())
            attempts = Counter(s.scalars(select(Job.attempts).where(Job.state == "succeeded")))
        lost_chips = [cid for cid, content_hash in ingest.acked.items() if stored.get(cid) != content_hash]
        lost_artifacts = []
        for sha, loc in artifacts:
            if loc.startswith("file://"):
                p = Path(loc.removeprefix("file://"))
                if not p.is_file() or hashlib.sha256(p.read_bytes()).hexdigest() != sha:
                    lost_artifacts.append(sha)
        during = [t for sent, t, _ in ingest.samples if any(a <= sent <= b for a, b in job_windows)]
        statuses = Counter(code for _, _, code in ingest.samples)
        report = {
            "bench": "soak",
            "rate_per_s": args.rate,
            "ingest_profile": "the plan's own" if args.same_profile else "a second profile",
            "plan_chips": args.chips,
            "execute_job": {"state": exec_state, "seconds": round(job_windows[0][1] - job_windows[0][0], 1)},
            "requests": {
                "sent": len(ingest.samples),
                "served": sum(n for code, n in statuses.items() if code),
                "by_status": {str(k): v for k, v in sorted(statuses.items())},
                "errors_5xx": sum(n for code, n in statuses.items() if code >= 500),
                "no_answer": statuses.get(0, 0),
            },
            "ingest_latency_ms": {
                "p50": _pct([t for _, t, _ in ingest.samples], 0.5),
                "p99": _pct([t for _, t, _ in ingest.samples], 0.99),
                "max": _pct([t for _, t, _ in ingest.samples], 1.0),
                "while_a_job_ran": {"n": len(during), "p50": _pct(during, 0.5), "p99": _pct(during, 0.99)},
            },
            "slow_ingests_over_100ms": [
                {"t_s": round(sent - t_origin, 1), "ms": round(t * 1000)} for sent, t, _ in ingest.samples if t > 0.1
            ][:300],
            "load_average": list(os.getloadavg()),
            "jobs": {
                "by_state": dict(jobs),
                "by_kind_state": dict(jobs_by_kind),
                "attempts_of_succeeded": dict(attempts),
            },
            "lost": {
                "chips": len(lost_chips),
                "jobs_not_finished": sum(n for st, n in jobs.items() if st not in TERMINAL),
                "jobs_failed": jobs.get("failed", 0),
                "artifacts": len(lost_artifacts),
            },
            "goal": {"lost": 0, "errors_5xx": 0, "p99_ms_while_a_job_ran": 100},
            "events": events,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        }
    finally:
        for p in (worker, api):
            if p is not None:
                p.stop()
        with contextlib.suppress(Exception):
            redis.stop()
        engine.dispose()
        with psycopg.connect(libpq, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    print(f"[soak] logs in {tmp}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
