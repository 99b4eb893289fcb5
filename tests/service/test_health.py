from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.integration


def test_health_and_readiness(service: Any) -> None:
    assert httpx.get(f"{service.base_url}/healthz").json() == {"status": "ok"}
    r = httpx.get(f"{service.base_url}/readyz")
    assert r.status_code == 200 and r.json()["checks"] == {"database": "ok", "broker": "ok"}
    assert httpx.get(f"{service.base_url}/docs").status_code == 200
    spec = httpx.get(f"{service.base_url}/openapi.json").json()
    assert "/api/v1/chips" in spec["paths"] and "/api/v1/chips/bulk" in spec["paths"]


def test_readyz_reports_unreachable_broker(pg_service: Any, tmp_path: Path, ff_tools: Any) -> None:
    Service, free_port, start_proc, PY = ff_tools.Service, ff_tools.free_port, ff_tools.start_proc, ff_tools.PY

    env = dict(pg_service.env)
    env["FAULTFLEET_BROKER_URL"] = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    svc = Service("bad-broker", env, tmp_path, "", pg_service.admin_key, pg_service.database_url)
    port = free_port()
    svc.api = start_proc([PY, "-m", "app.cli", "serve", "--port", str(port)], env, tmp_path, "api")
    try:
        url = f"http://127.0.0.1:{port}"
        import time

        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(f"{url}/healthz", timeout=2)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, svc.api.log_tail()
            time.sleep(0.1)
        r = httpx.get(f"{url}/readyz", timeout=30)
        assert r.status_code == 503
        body = r.json()
        assert body["checks"]["database"] == "ok" and body["checks"]["broker"].startswith("unreachable")
        assert body["errors"][0]["loc"] == ["broker"]
    finally:
        svc.stop()
