"""Per-API-key rate limit of ingestion (FAULTFLEET_INGEST_RATE_LIMIT), over real servers.

Embedded: counted in process memory. PostgreSQL + Redis: counted in Redis, shared by the two
uvicorn processes the service runs here (FAULTFLEET_API_WORKERS=2), so a key's budget is one.
"""

from __future__ import annotations

import json
import shutil
import time
from typing import Any

import httpx
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LIMIT = 4
WINDOW_S = 3


@pytest.fixture(scope="module", params=["embedded", "postgres"])
def limited(request: pytest.FixtureRequest, ff_tools: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    env = {"FAULTFLEET_INGEST_RATE_LIMIT": f"{LIMIT}/{WINDOW_S} seconds"}
    if request.param == "postgres":
        env["FAULTFLEET_API_WORKERS"] = "2"
    with ff_tools.running_service(request.param, tmp_path_factory.mktemp(f"rl-{request.param}"), **env) as svc:
        with svc.client() as c:
            assert c.post("/api/v1/accelerators", json={"name": "rl32", "rows": 32, "cols": 32}).status_code == 201
        yield svc


def _post(base_url: str, key: str, doc: dict[str, Any]) -> httpx.Response:
    # a new connection per request, so that requests spread over the API processes
    return httpx.post(f"{base_url}/api/v1/chips", json=doc, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def test_each_key_has_its_own_budget_and_is_told_when_to_retry(limited: Any, ff_tools: Any) -> None:
    first, second = limited.create_key("ingest"), limited.create_key("ingest")
    maps = [ff_tools.random_fault_map(f"rl-{limited.name}-{i}", "rl32") for i in range(3 * LIMIT)]
    t0 = time.monotonic()
    codes = [_post(limited.base_url, first, maps[i]).status_code for i in range(LIMIT)]
    if time.monotonic() - t0 > WINDOW_S:
        pytest.skip("this machine is too slow for the window the test uses")
    assert codes == [201] * LIMIT
    over = _post(limited.base_url, first, maps[LIMIT])
    assert over.status_code == 429, over.text
    retry_after = int(over.headers["retry-after"])
    assert 1 <= retry_after <= WINDOW_S
    assert f"{LIMIT} per {WINDOW_S} second" in over.json()["detail"] and "retry after" in over.json()["detail"]
    # a refused request wrote nothing; other keys, and reads, are not affected
    with limited.client() as c:
        assert c.get(f"/api/v1/chips/{maps[LIMIT]['chip_id']}").status_code == 404
    assert _post(limited.base_url, second, maps[LIMIT + 1]).status_code == 201
    # bulk requests count against the same budget
    body = json.dumps(maps[LIMIT + 2]) + "\n"
    r = httpx.post(
        f"{limited.base_url}/api/v1/chips/bulk",
        content=body,
        headers={"Authorization": f"Bearer {first}", "Content-Type": "application/x-ndjson"},
    )
    assert r.status_code == 429 and "retry-after" in r.headers, r.text
    time.sleep(retry_after + 0.2)
    assert _post(limited.base_url, first, maps[LIMIT]).status_code == 201


def test_the_budget_holds_across_api_processes(limited: Any, ff_tools: Any) -> None:
    key = limited.create_key("ingest")
    maps = [ff_tools.random_fault_map(f"rl2-{limited.name}-{i}", "rl32") for i in range(3 * LIMIT)]
    t0 = time.monotonic()
    codes = [_post(limited.base_url, key, m).status_code for m in maps]
    if time.monotonic() - t0 > WINDOW_S:
        pytest.skip("this machine is too slow for the window the test uses")
    assert codes.count(201) == LIMIT and codes.count(429) == len(maps) - LIMIT, codes


def test_counts_live_in_redis_and_ingestion_passes_when_redis_is_gone(ff_tools: Any, tmp_path: Any) -> None:
    """A Redis of the test's own as the broker: the counts are there; stopped, ingestion still passes."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    port = ff_tools.free_port()
    redis = ff_tools.start_proc(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"], {}, tmp_path, "redis"
    )
    try:
        deadline = time.monotonic() + 20
        while "Ready to accept connections" not in redis.log_tail():
            assert redis.alive() and time.monotonic() < deadline, redis.log_tail()
            time.sleep(0.1)
        url = f"redis://127.0.0.1:{port}/0"
        env = {
            "FAULTFLEET_BROKER_URL": url,
            "FAULTFLEET_RESULT_BACKEND": url,
            "FAULTFLEET_INGEST_RATE_LIMIT": "2/minute",
        }
        with ff_tools.running_service("embedded", tmp_path / "svc", **env) as svc:
            key = svc.create_key("ingest")
            with svc.client() as c:
                assert c.post("/api/v1/accelerators", json={"name": "rr32", "rows": 32, "cols": 32}).status_code == 201
            maps = [ff_tools.random_fault_map(f"rr-{i}", "rr32") for i in range(5)]
            assert [_post(svc.base_url, key, m).status_code for m in maps[:3]] == [201, 201, 429]
            import redis as redis_client

            keys = redis_client.Redis.from_url(url).keys("faultfleet-ratelimit*")
            assert keys, "no rate-limit counts in Redis"
            redis.kill()
            t0 = time.monotonic()
            r = _post(svc.base_url, key, maps[3])
            assert r.status_code == 201, r.text  # the limit's store is down: let ingestion through
            assert time.monotonic() - t0 < 10
    finally:
        if redis.alive():
            redis.kill()


def _bulk(base_url: str, key: str, maps: list[dict[str, Any]]) -> httpx.Response:
    body = "".join(json.dumps(m) + "\n" for m in maps)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/x-ndjson"}
    return httpx.post(f"{base_url}/api/v1/chips/bulk", content=body, headers=headers, timeout=30)


def test_a_bulk_costs_one_unit_a_line(limited: Any, ff_tools: Any) -> None:
    key = limited.create_key("ingest")
    maps = [ff_tools.random_fault_map(f"rlb-{limited.name}-{i}", "rl32") for i in range(4 * LIMIT)]
    t0 = time.monotonic()
    small = _bulk(limited.base_url, key, maps[: LIMIT - 1])  # 3 of the 4 units
    over = _bulk(limited.base_url, key, maps[LIMIT - 1 : LIMIT + 1])  # 2 lines, 1 unit left
    single = _post(limited.base_url, key, maps[LIMIT + 1])  # the last unit
    if time.monotonic() - t0 > WINDOW_S:
        pytest.skip("this machine is too slow for the window the test uses")
    assert small.status_code == 200 and small.json()["created"] == LIMIT - 1, small.text
    assert over.status_code == 429, over.text
    assert 1 <= int(over.headers["retry-after"]) <= WINDOW_S
    assert "bulk of 2 lines" in over.json()["detail"] and "retry after" in over.json()["detail"]
    assert single.status_code == 201, single.text  # the refused bulk was charged nothing
    with limited.client() as c:  # and wrote nothing
        assert c.get(f"/api/v1/chips/{maps[LIMIT - 1]['chip_id']}").status_code == 404
    time.sleep(WINDOW_S + 0.2)  # a whole window later, the full budget is back
    # larger than the limit allows in a whole window: no Retry-After would help, so a 413 saying so
    too_big = _bulk(limited.base_url, key, maps[LIMIT + 2 : 2 * LIMIT + 3])
    assert too_big.status_code == 413 and "retry-after" not in too_big.headers, too_big.text
    assert f"at most {LIMIT} lines" in too_big.json()["detail"]
    again = _bulk(limited.base_url, key, maps[LIMIT - 1 : 2 * LIMIT - 1])
    assert again.status_code == 200 and again.json()["lines_total"] == LIMIT, again.text
