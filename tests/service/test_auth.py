"""API keys: hashed at rest, scopes per route, 401 without/with an unknown key, 403 with the wrong scope."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

pytestmark = pytest.mark.integration


def test_scopes(service: Any, accelerator: str, uid: str, make_map: Any) -> None:
    ingest = service.create_key("ingest")
    read = service.create_key("read")
    plan = service.create_key("plan", "read")
    doc = make_map(f"auth-{uid}", accelerator)
    with service.client(ingest) as c:
        assert c.post("/api/v1/chips", json=doc).status_code == 201
        r = c.get(f"/api/v1/chips/auth-{uid}")
        assert r.status_code == 403 and "read" in r.json()["detail"]
        assert c.post("/api/v1/accelerators", json={"name": f"n{uid}", "rows": 2, "cols": 2}).status_code == 403
    with service.client(read) as c:
        assert c.get(f"/api/v1/chips/auth-{uid}").status_code == 200
        assert c.post("/api/v1/chips", json=doc).status_code == 403
        assert c.post("/api/v1/fleet/stats", json={}).status_code == 403
    with service.client(plan) as c:
        r = c.post("/api/v1/fleet/stats", json={"accelerator": accelerator})
        assert r.status_code == 202, r.text
        service.wait_job(r.json()["id"])
    with service.client("") as c:  # no key at all
        r = c.get("/api/v1/chips")
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert r.json()["detail"]
    with service.client("ff_not-a-real-key") as c:
        assert c.get("/api/v1/chips").status_code == 401
    # X-API-Key works as well as Authorization: Bearer
    with service.client("") as c:
        assert c.get(f"/api/v1/chips/auth-{uid}", headers={"X-API-Key": read}).status_code == 200
        assert c.get("/healthz").status_code == 200  # probes need no key


def test_keys_are_stored_hashed(service: Any) -> None:
    key = service.create_key("read")
    assert key.startswith("ff_") and len(key) > 40
    engine = create_engine(service.database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT prefix, key_hash, scopes FROM api_keys")).all()
    finally:
        engine.dispose()
    assert all(key not in (r.key_hash, r.prefix) for r in rows)
    import hashlib

    assert hashlib.sha256(key.encode()).hexdigest() in {r.key_hash for r in rows}


def test_keys_create_console_script(service: Any) -> None:
    exe = Path(os.environ.get("VIRTUAL_ENV", "")) / "bin" / "faultfleet"
    if not exe.exists():
        import sys

        exe = Path(sys.executable).parent / "faultfleet"
    res = subprocess.run(
        [str(exe), "keys", "create", "--scope", "ingest"], env=service.env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    key = res.stdout.strip()
    assert key.startswith("ff_") and "\n" not in key
    with service.client(key) as c:
        assert c.get("/api/v1/chips").status_code == 403  # ingest only
    bad = subprocess.run(
        [str(exe), "keys", "create", "--scope", "root"], env=service.env, capture_output=True, text=True, timeout=60
    )
    assert bad.returncode != 0 and "unknown scope" in bad.stderr


def test_embedded_admin_key_file(embedded_service: Any) -> None:
    path = Path(embedded_service.env["FAULTFLEET_VAR_DIR"]) / "admin.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # a second migrate keeps the key
    before = path.read_text()
    assert embedded_service.cli("migrate").returncode == 0
    assert path.read_text() == before


def test_keys_list_and_revoke(service: Any) -> None:
    key = service.create_key("read")
    prefix = key[:11]
    listed = service.cli("keys", "list")
    assert listed.returncode == 0 and prefix in listed.stdout and key not in listed.stdout
    with service.client(key) as c:
        assert c.get("/api/v1/chips", params={"limit": 1}).status_code == 200
    res = service.cli("keys", "revoke", prefix + "...")
    assert res.returncode == 0, res.stderr
    import time

    time.sleep(float(service.env["FAULTFLEET_AUTH_CACHE_S"]) + 0.2)  # the in-process cache expires
    with service.client(key) as c:
        assert c.get("/api/v1/chips", params={"limit": 1}).status_code == 401
    assert service.cli("keys", "revoke", prefix).returncode == 1
