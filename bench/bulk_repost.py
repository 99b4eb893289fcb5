#!/usr/bin/env python3
"""Re-posting an unchanged bulk file against creating it (issue 19 item 10), on PostgreSQL or SQLite.

Starts an API on loopback with its own database, posts one NDJSON file of `--lines` fault maps
(32x32, 1 % faulty PEs) as `POST /api/v1/chips/bulk` requests of `--batch` lines, then posts the
same file again (every line 'unchanged'). Prints one JSON document with both wall times. A
benchmark reports figures; it never passes or fails on time.

    .venv/bin/python bench/bulk_repost.py                    # PostgreSQL, 40,000 lines
    .venv/bin/python bench/bulk_repost.py --backend sqlite --lines 20000
"""

from __future__ import annotations

import argparse
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ingest import fault_map  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _database(backend: str, pg_admin_url: str, tmp: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{tmp / 'var' / 'faultfleet.db'}"
        return
    import psycopg

    name = f"ff_bench_{uuid.uuid4().hex[:10]}"
    libpq = pg_admin_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(libpq, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield pg_admin_url.rpartition("/")[0] + f"/{name}"
    finally:
        with psycopg.connect(libpq, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _post_all(client: httpx.Client, batches: list[bytes]) -> tuple[float, dict[str, int]]:
    counts: dict[str, int] = {}
    t0 = time.perf_counter()
    for body in batches:
        r = client.post("/api/v1/chips/bulk", content=body, headers={"content-type": "application/x-ndjson"})
        r.raise_for_status()
        for k in ("created", "unchanged", "replaced", "rejected"):
            counts[k] = counts.get(k, 0) + r.json()[k]
    return time.perf_counter() - t0, counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=("postgres", "sqlite"), default="postgres")
    ap.add_argument("--pg-admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    ap.add_argument("--lines", type=int, default=40_000)
    ap.add_argument("--batch", type=int, default=40_000, help="lines per bulk request")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()

    rnd = random.Random(0)
    lines = [json.dumps(fault_map(f"rp-{i:06d}", rnd, "sa32")) for i in range(args.lines)]
    batches = ["\n".join(lines[i : i + args.batch]).encode() for i in range(0, len(lines), args.batch)]
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ff-repost-")))
        db = stack.enter_context(_database(args.backend, args.pg_admin_url, tmp))
        env = {k: v for k, v in os.environ.items() if not k.startswith("FAULTFLEET_")}
        env.update(
            FAULTFLEET_DATABASE_URL=db,
            FAULTFLEET_VAR_DIR=str(tmp / "var"),
            FAULTFLEET_API_KEYS='["admin:bench"]',
            PYTHONUNBUFFERED="1",
            PYTHONPATH=str(ROOT),
        )
        subprocess.run([sys.executable, "-m", "app.cli", "migrate"], env=env, cwd=tmp, check=True, capture_output=True)
        port = _free_port()
        log = (tmp / "api.log").open("wb")
        api = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--no-access-log"],
            env=env,
            cwd=tmp,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline or api.poll() is not None:
                    raise RuntimeError((tmp / "api.log").read_text()[-4000:])
                time.sleep(0.1)
            with httpx.Client(base_url=url, headers={"X-API-Key": "bench"}, timeout=600) as c:
                prof = {"name": "sa32", "rows": 32, "cols": 32, "fmt": "int8", "bypass": True}
                c.post("/api/v1/accelerators", json=prof).raise_for_status()
                first_s, first = _post_all(c, batches)
                again_s, again = _post_all(c, batches)
        finally:
            api.terminate()
            api.wait(timeout=30)
    result: dict[str, Any] = {
        "bench": "bulk_repost",
        "backend": args.backend,
        "lines": args.lines,
        "lines_per_request": args.batch,
        "first_post": {"seconds": round(first_s, 3), "maps_per_s": round(args.lines / first_s), **first},
        "repost_unchanged": {"seconds": round(again_s, 3), "maps_per_s": round(args.lines / again_s), **again},
        "repost_over_first": round(again_s / first_s, 3),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
