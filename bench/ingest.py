#!/usr/bin/env python3
"""Ingestion benchmark: uvicorn on loopback backed by PostgreSQL.

Measures (1) single ``POST /api/v1/chips`` at a fixed concurrency (default 16): requests/s and
p50/p90/p99 latency, and (2) ``POST /api/v1/chips/bulk`` NDJSON throughput in fault maps/s.
Fault maps are 32x32 arrays with 1 % faulty PEs. Both phases are bounded in count and time.
Prints one JSON document. A benchmark reports figures; it never passes or fails on time.

    .venv/bin/python bench/ingest.py                       # own database ff_bench_<random>, dropped after
    .venv/bin/python bench/ingest.py --single-count 20000 --bulk-requests 5 --out bench.json

The client is a minimal asyncio HTTP/1.1 keep-alive client, so that on a 2-core machine the
load generator takes as little CPU from the server as possible (it still shares the cores).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GOALS = {"single_rps": 500, "single_p99_ms": 50, "bulk_maps_per_s": 5000}


def fault_map(chip_id: str, rnd: random.Random, accelerator: str, rows: int = 32, cols: int = 32) -> dict[str, Any]:
    n = max(1, round(0.01 * rows * cols))
    faults: list[dict[str, Any]] = []
    for pe in rnd.sample(range(rows * cols), n):
        r, c = divmod(pe, cols)
        site = rnd.choice(("pe", "weight", "act", "psum"))
        if site == "pe":
            faults.append({"row": r, "col": c, "site": "pe"})
        else:
            bit = rnd.randrange(32 if site == "psum" else 8)
            faults.append({"row": r, "col": c, "site": site, "bit": bit, "stuck": rnd.randrange(2)})
    lot = f"L{rnd.randrange(100):03d}"
    return {
        "chip_id": chip_id,
        "accelerator": accelerator,
        "array": {"rows": rows, "cols": cols},
        "faults": faults,
        "lot": lot,
        "wafer": rnd.randrange(25),
        "die_x": rnd.randrange(40),
        "die_y": rnd.randrange(40),
    }


class Conn:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, host: str, port: int, key: str) -> None:
        self.host, self.port, self.key = host, port, key
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 24)

    async def post(self, path: str, body: bytes, ctype: str = "application/json") -> tuple[int, bytes]:
        assert self.reader is not None and self.writer is not None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nAuthorization: Bearer {self.key}\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head + body)
        await self.writer.drain()
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        data = await self.reader.readexactly(length) if length else b""
        return status, data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()


def pct(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    i = min(len(sorted_vals) - 1, max(0, round(q * (len(sorted_vals) - 1))))
    return sorted_vals[i]


async def single_phase(
    host: str, port: int, key: str, bodies: list[bytes], concurrency: int, max_seconds: float
) -> dict[str, Any]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    it = iter(bodies)
    deadline = time.perf_counter() + max_seconds

    async def worker() -> None:
        c = Conn(host, port, key)
        await c.open()
        try:
            for body in it:
                if time.perf_counter() > deadline:
                    return
                t0 = time.perf_counter()
                status, _ = await c.post("/api/v1/chips", body)
                latencies.append(time.perf_counter() - t0)
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            await c.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    lat = sorted(latencies)
    ms = [x * 1000 for x in lat]
    return {
        "requests": len(lat),
        "concurrency": concurrency,
        "seconds": round(elapsed, 3),
        "requests_per_s": round(len(lat) / elapsed, 1),
        "latency_ms": {
            "p50": round(pct(ms, 0.50), 2),
            "p90": round(pct(ms, 0.90), 2),
            "p99": round(pct(ms, 0.99), 2),
            "max": round(ms[-1], 2) if ms else None,
            "mean": round(sum(ms) / len(ms), 2) if ms else None,
        },
        "status_counts": {str(k): v for k, v in sorted(statuses.items())},
    }


async def bulk_phase(
    host: str, port: int, key: str, bodies: list[bytes], lines_per: int, max_seconds: float, concurrency: int = 1
) -> dict[str, Any]:
    per_request: list[dict[str, Any]] = []
    it = iter(bodies)
    t_start = time.perf_counter()

    async def worker() -> None:
        c = Conn(host, port, key)
        await c.open()
        try:
            for body in it:
                if time.perf_counter() - t_start > max_seconds:
                    return
                t0 = time.perf_counter()
                status, data = await c.post("/api/v1/chips/bulk", body, "application/x-ndjson")
                dt = time.perf_counter() - t0
                res = json.loads(data) if status == 200 else {"error": data[:500].decode(errors="replace")}
                per_request.append(
                    {
                        "status": status,
                        "lines": lines_per,
                        "seconds": round(dt, 3),
                        "maps_per_s": round(lines_per / dt, 1),
                        "created": res.get("created"),
                        "rejected": res.get("rejected"),
                    }
                )
        finally:
            await c.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t_start
    total_lines = sum(r["lines"] for r in per_request if r["status"] == 200)
    return {
        "requests": len(per_request),
        "concurrency": concurrency,
        "lines_per_request": lines_per,
        "body_bytes_per_request": len(bodies[0]) if bodies else 0,
        "maps": total_lines,
        "created": sum(int(r["created"] or 0) for r in per_request),
        "seconds": round(elapsed, 3),
        "maps_per_s": round(total_lines / elapsed, 1) if elapsed else None,
        "per_request": per_request,
    }


def _tree_cpu_s(pid: int) -> float:
    """user+system CPU seconds of `pid` and its descendants (Linux /proc), 0.0 elsewhere."""
    try:
        procs: dict[int, tuple[int, float]] = {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            procs[int(d.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    except OSError:
        return 0.0
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        if p in procs:
            total += procs[p][1]
        todo += [c for c, (ppid, _) in procs.items() if ppid == p]
    return total


def _runner(loop: str) -> Any:
    """asyncio.run with the client's event loop: uvloop (installed with uvicorn[standard]) costs the
    load generator less CPU than the default loop, CPU that it shares with the server here."""
    factory = None
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop

    def run(coro: Any) -> Any:
        with asyncio.Runner(loop_factory=factory) as r:
            return r.run(coro)

    return run


def _postmaster_pid(db_url: str) -> int | None:
    """PostgreSQL's postmaster, when it runs on this machine: the parent of our backend."""
    import psycopg

    try:
        with psycopg.connect(_libpq(db_url)) as conn:
            row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        return int(Path(f"/proc/{row[0]}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except Exception:
        return None


def _machine_busy_s() -> float:
    """CPU seconds all cores spent busy since boot (Linux /proc/stat), 0.0 elsewhere."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def _redis_ok(url: str) -> bool:
    try:
        import redis

        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
        return True
    except Exception:
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pg-admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--single-count", type=int, default=10_000, help="most single POSTs")
    ap.add_argument("--single-seconds", type=float, default=20.0, help="most seconds for single POSTs")
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--bulk-lines", type=int, default=10_000, help="fault maps per bulk request")
    ap.add_argument("--bulk-requests", type=int, default=4)
    ap.add_argument("--bulk-seconds", type=float, default=60.0)
    ap.add_argument("--bulk-concurrency", type=int, default=1, help="bulk requests in flight at once")
    ap.add_argument("--client-loop", choices=("uvloop", "asyncio"), default="uvloop", help="the client's event loop")
    ap.add_argument("--api-workers", type=int, default=1, help="uvicorn worker processes")
    ap.add_argument("--keep-db", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()

    import psycopg

    db = f"ff_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(_libpq(args.pg_admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    db_url = args.pg_admin_url.rpartition("/")[0] + f"/{db}"
    tmp = Path(tempfile.mkdtemp(prefix="ff-bench-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAULTFLEET_")}
    env.update(FAULTFLEET_DATABASE_URL=db_url, FAULTFLEET_VAR_DIR=str(tmp / "var"), PYTHONUNBUFFERED="1")
    broker = "filesystem (Redis unreachable)"
    if _redis_ok(args.redis_url):
        env.update(
            FAULTFLEET_BROKER_URL=args.redis_url,
            FAULTFLEET_QUEUE=f"ffbench-{db}",
            FAULTFLEET_REDIS_KEY_PREFIX=f"ffbench-{db}:",
        )
        broker = "redis"
    py = sys.executable
    api = None
    try:
        cli = [py, "-m", "app.cli"]
        subprocess.run([*cli, "migrate"], env=env, cwd=ROOT, check=True, capture_output=True)
        key = subprocess.run(
            [*cli, "keys", "create", "--scope", "admin"], env=env, cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout.strip()
        port = _free_port()
        log = (tmp / "api.log").open("wb")
        api = subprocess.Popen(
            [*cli, "serve", "--port", str(port), "--no-access-log", "--log-level", "warning",
             "--workers", str(args.api_workers)],
            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        import httpx

        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if api.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"API did not start: {(tmp / 'api.log').read_text()[-3000:]}")
            time.sleep(0.1)
        h = {"Authorization": f"Bearer {key}"}
        r = httpx.post(f"{base}/api/v1/accelerators", headers=h, json={"name": "sa32-int8", "rows": 32, "cols": 32})
        r.raise_for_status()

        rnd = random.Random(42)
        n_single = args.single_count + args.warmup
        singles = [
            json.dumps(fault_map(f"S{i:07d}", rnd, "sa32-int8"), separators=(",", ":")).encode()
            for i in range(n_single)
        ]
        bulks = []
        for b in range(args.bulk_requests):
            lines = (
                json.dumps(fault_map(f"B{b:03d}-{i:06d}", rnd, "sa32-int8"), separators=(",", ":"))
                for i in range(args.bulk_lines)
            )
            bulks.append(("\n".join(lines) + "\n").encode())

        load_before = os.getloadavg()
        run = _runner(args.client_loop)
        run(single_phase("127.0.0.1", port, key, singles[: args.warmup], args.concurrency, 30))
        pg = _postmaster_pid(db_url)
        pg0 = _tree_cpu_s(pg) if pg else 0.0
        cpu0, client0, busy0 = _tree_cpu_s(api.pid), time.process_time(), _machine_busy_s()
        single = run(
            single_phase("127.0.0.1", port, key, singles[args.warmup :], args.concurrency, args.single_seconds)
        )
        cpu1, client1, busy1 = _tree_cpu_s(api.pid), time.process_time(), _machine_busy_s()
        pg1 = _tree_cpu_s(pg) if pg else 0.0
        n = max(single["requests"], 1)
        single["api_cpu_ms_per_request"] = round(1000 * (cpu1 - cpu0) / n, 3)
        if pg:  # every database's backends, so other users of this PostgreSQL count too
            single["postgres_cpu_ms_per_request"] = round(1000 * (pg1 - pg0) / n, 3)
        single["client_cpu_ms_per_request"] = round(1000 * (client1 - client0) / n, 3)
        # everything else that ran meanwhile: PostgreSQL, the kernel, and other users of the machine
        single["machine_cpu_ms_per_request"] = round(1000 * (busy1 - busy0) / n, 3)
        bulk = run(bulk_phase("127.0.0.1", port, key, bulks, args.bulk_lines, args.bulk_seconds, args.bulk_concurrency))
        load_after = os.getloadavg()
        bulk["api_cpu_us_per_map"] = round(1e6 * (_tree_cpu_s(api.pid) - cpu1) / max(bulk["maps"], 1), 1)

        out = {
            "benchmark": "faultfleet ingest",
            "setup": {
                "server": f"uvicorn x{args.api_workers} on 127.0.0.1 (faultfleet serve)",
                "database": "PostgreSQL (fresh database)",
                "broker": broker,
                "fault_maps": "32x32 int8 arrays, 1% faulty PEs (10 faults), random sites",
                "client": f"asyncio ({args.client_loop} loop) HTTP/1.1 keep-alive, same machine",
                "cpu_count": os.cpu_count(),
                "loadavg_before": [round(x, 2) for x in load_before],
                "loadavg_after": [round(x, 2) for x in load_after],
                "python": platform.python_version(),
                "note": "CPU shared with the load generator and with other users of the machine; "
                "api_cpu_* is the API processes' own CPU time (PostgreSQL's is not included)",
            },
            "single_post": single,
            "bulk_ndjson": bulk,
            "goals": {
                **GOALS,
                "single_rps_met": single["requests_per_s"] >= GOALS["single_rps"],
                "single_p99_met": single["latency_ms"]["p99"] < GOALS["single_p99_ms"],
                "bulk_met": (bulk["maps_per_s"] or 0) >= GOALS["bulk_maps_per_s"],
            },
        }
        text = json.dumps(out, indent=2)
        print(text)
        if args.out:
            args.out.write_text(text + "\n")
        return 0
    finally:
        if api is not None:
            api.terminate()
            try:
                api.wait(timeout=15)
            except subprocess.TimeoutExpired:
                api.kill()
        if not args.keep_db:
            with psycopg.connect(_libpq(args.pg_admin_url), autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        if broker == "redis":
            import redis

            rc = redis.Redis.from_url(args.redis_url)
            keys = list(rc.scan_iter(match=f"ffbench-{db}:*"))
            if keys:
                rc.delete(*keys)


if __name__ == "__main__":
    sys.exit(main())
