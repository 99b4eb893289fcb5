"""Issue 19 item 1: the database down or locked -> 503 + Retry-After naming it; recovery without a restart.

Real faults: PostgreSQL behind a TCP proxy whose port is closed (its connections reset), and a
SQLite write lock held by another connection past a short busy timeout.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.faults import TcpProxy

pytestmark = pytest.mark.integration


def _start_api(ff_tools: Any, env: dict[str, str], workdir: Path) -> tuple[Any, str]:
    port = ff_tools.free_port()
    proc = ff_tools.start_proc(
        [ff_tools.PY, "-m", "app.cli", "serve", "--port", str(port), "--log-level", "warning"], env, workdir, "api"
    )
    url = f"http://127.0.0.1:{port}"
    ff_tools.wait_ready(url, proc)
    return proc, url


def _writes(c: httpx.Client, uid: str, profile: str) -> dict[str, httpx.Response]:
    fm = {"chip_id": f"down-{uid}", "accelerator": profile, "array": {"rows": 32, "cols": 32}, "faults": []}
    line = dict(fm, chip_id=f"down-bulk-{uid}")
    import json

    return {
        "POST /chips": c.post("/api/v1/chips", json=fm),
        "POST /chips/bulk": c.post(
            "/api/v1/chips/bulk", content=json.dumps(line) + "\n", headers={"content-type": "application/x-ndjson"}
        ),
        "GET /chips": c.get("/api/v1/chips"),
        "POST /plans": c.post(
            "/api/v1/plans", json={"model": "nope", "chips": {"ids": ["x"]}, "constraint": {"max_drop": 0.01}}
        ),
        "POST /accelerators": c.post(
            "/api/v1/accelerators", json={"name": f"p-{uid}", "rows": 8, "cols": 8, "fmt": "int8"}
        ),
        "GET /jobs/x": c.get("/api/v1/jobs/x"),
    }


def _assert_503(answers: dict[str, httpx.Response], word: str) -> None:
    for route, r in answers.items():
        assert r.status_code == 503, (route, r.status_code, r.text)
        assert int(r.headers["retry-after"]) >= 1, route
        body = r.json()
        assert body["detail"].startswith(word), (route, body)
        assert body["errors"][0]["loc"] == ["database"]


def test_postgres_unreachable_answers_503_and_recovers(pg_service: Any, tmp_path: Path, ff_tools: Any) -> None:
    from sqlalchemy import make_url

    url = make_url(pg_service.database_url)
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432)).up()
    env = dict(pg_service.env)
    env["FAULTFLEET_DATABASE_URL"] = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    env["FAULTFLEET_AUTH_CACHE_S"] = "0"  # every request looks its key up: the first database touch
    env["FAULTFLEET_DB_CONNECT_TIMEOUT_S"] = "2"
    profile = f"dd-{uuid.uuid4().hex[:6]}"
    api, base = _start_api(ff_tools, env, tmp_path)
    try:
        with httpx.Client(base_url=base, headers={"X-API-Key": pg_service.admin_key}, timeout=30) as c:
            r = c.post("/api/v1/accelerators", json={"name": profile, "rows": 32, "cols": 32, "fmt": "int8"})
            assert r.status_code == 201, r.text
            assert c.get("/api/v1/chips").status_code == 200  # the pool holds live connections now

            proxy.down()  # the port is closed, the pooled connections are reset
            t0 = time.monotonic()
            down = _writes(c, "a" + uuid.uuid4().hex[:6], profile)
            took = time.monotonic() - t0
            _assert_503(down, "database unavailable")
            assert int(down["POST /chips"].headers["retry-after"]) == 5
            assert took < 10, f"{len(down)} requests took {took:.1f} s with the database down"
            ready = httpx.get(f"{base}/readyz", timeout=30)
            assert ready.status_code == 503 and ready.json()["checks"]["database"].startswith("unreachable")

            proxy.up()  # back, same port: no restart of the API
            uid = "b" + uuid.uuid4().hex[:6]
            back = _writes(c, uid, profile)
            assert back["POST /chips"].status_code == 201, back["POST /chips"].text
            assert back["POST /chips/bulk"].json()["created"] == 1
            assert back["GET /chips"].status_code == 200
            assert back["POST /plans"].status_code == 404  # the model 'nope' does not exist: a real answer
            assert back["POST /accelerators"].status_code == 201
            assert back["GET /jobs/x"].status_code == 404
            assert httpx.get(f"{base}/readyz", timeout=30).status_code == 200
        assert api.alive()
        assert "Traceback" not in api.log_tail(100_000)
    finally:
        api.stop()
        proxy.down()


def test_sqlite_lock_timeout_answers_503_and_recovers(tmp_path: Path, ff_tools: Any) -> None:
    env = ff_tools.base_env(
        FAULTFLEET_VAR_DIR=str(tmp_path / "var"), FAULTFLEET_DB_BUSY_TIMEOUT_S="0.3", FAULTFLEET_AUTH_CACHE_S="0"
    )
    assert ff_tools.run_cli(["migrate"], env, tmp_path).returncode == 0
    key = (tmp_path / "var" / "admin.key").read_text().strip()
    api, base = _start_api(ff_tools, env, tmp_path)
    holder = sqlite3.connect(tmp_path / "var" / "faultfleet.db", isolation_level=None)
    try:
        with httpx.Client(base_url=base, headers={"X-API-Key": key}, timeout=30) as c:
            r = c.post("/api/v1/accelerators", json={"name": "lk", "rows": 32, "cols": 32, "fmt": "int8"})
            assert r.status_code == 201, r.text

            holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
            locked = _writes(c, uuid.uuid4().hex[:6], "lk")
            _assert_503(locked, "database busy")
            assert "locked" in locked["POST /chips"].json()["detail"]
            holder.execute("ROLLBACK")

            back = _writes(c, uuid.uuid4().hex[:6], "lk")
            assert back["POST /chips"].status_code == 201, back["POST /chips"].text
            assert back["POST /chips/bulk"].json()["created"] == 1
        assert api.alive()
    finally:
        holder.close()
        api.stop()
