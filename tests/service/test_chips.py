"""Chip ingestion through a real uvicorn + database, on PostgreSQL and on the embedded default."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

pytestmark = pytest.mark.integration

EXAMPLE_FAULTS = [
    {"row": 3, "col": 7, "site": "psum", "bit": 21, "stuck": 1},
    {"row": 9, "col": 0, "site": "weight", "bit": 6, "stuck": 0},
    {"row": 12, "col": 30, "site": "pe"},
]


def _map(chip_id: str, accelerator: str, faults: list[dict[str, Any]] | None = None, **kw: Any) -> dict[str, Any]:
    d = {
        "chip_id": chip_id,
        "accelerator": accelerator,
        "array": {"rows": 32, "cols": 32},
        "faults": EXAMPLE_FAULTS if faults is None else faults,
        "lot": "L042",
        "wafer": 7,
        "die_x": 12,
        "die_y": 3,
    }
    d.update(kw)
    return d


def test_accelerator_profiles(service: Any, uid: str) -> None:
    body = {"name": f"sa8-{uid}", "rows": 8, "cols": 8, "fmt": "int8", "bypass": False}
    with service.client() as c:
        r = c.post("/api/v1/accelerators", json=body)
        assert r.status_code == 201, r.text
        assert r.json()["rows"] == 8 and r.json()["bypass"] is False
        assert c.post("/api/v1/accelerators", json=body).status_code == 200  # identical: idempotent
        r = c.post("/api/v1/accelerators", json={**body, "rows": 16})
        assert r.status_code == 409 and r.json()["errors"][0]["loc"] == ["body", "name"]
        assert c.get(f"/api/v1/accelerators/sa8-{uid}").json()["cols"] == 8
        r = c.get("/api/v1/accelerators/nope-nope")
        assert r.status_code == 404 and r.json()["detail"]
        r = c.post("/api/v1/accelerators", json={**body, "name": f"x-{uid}", "fmt": "fp4"})
        assert r.status_code == 422 and "fp4" in r.json()["detail"]
        r = c.post("/api/v1/accelerators", json={**body, "name": f"y-{uid}", "rows": 0})
        assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "rows"]


def test_post_chip_create_idempotent_conflict_replace(service: Any, accelerator: str, uid: str) -> None:
    cid = f"L042-W07-{uid}"
    doc = _map(cid, accelerator)
    with service.client() as c:
        r = c.post("/api/v1/chips", json=doc)
        assert r.status_code == 201, r.text
        first = r.json()
        assert first["status"] == "created" and first["revision"] == 1 and first["n_faults"] == 3
        assert first["fault_rate"] == pytest.approx(3 / 1024)

        # identical re-POST (faults in another order, keys reordered): 200, same resource
        shuffled = {**doc, "faults": list(reversed(EXAMPLE_FAULTS))}
        r = c.post("/api/v1/chips", content=json.dumps(dict(reversed(list(shuffled.items())))))
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "unchanged"
        assert r.json()["content_hash"] == first["content_hash"] and r.json()["revision"] == 1

        changed = _map(cid, accelerator, faults=EXAMPLE_FAULTS[:2])
        r = c.post("/api/v1/chips", json=changed)
        assert r.status_code == 409, r.text
        assert r.json()["errors"][0]["loc"] == ["body", "chip_id"] and "replace=true" in r.json()["detail"]

        r = c.post("/api/v1/chips", params={"replace": "true"}, json=changed)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "replaced" and r.json()["revision"] == 2

        r = c.get(f"/api/v1/chips/{cid}")
        assert r.status_code == 200
        chip = r.json()
        assert chip["revision"] == 2 and len(chip["fault_map"]["faults"]) == 2
        assert [rev["revision"] for rev in chip["revisions"]] == [1, 2]
        assert len(chip["revisions"][0]["fault_map"]["faults"]) == 3  # the old map is kept
        assert chip["revisions"][0]["content_hash"] == first["content_hash"]


def test_concurrent_identical_posts_create_once(service: Any, accelerator: str, uid: str) -> None:
    doc = _map(f"race-{uid}", accelerator)
    with service.client() as c, ThreadPoolExecutor(8) as pool:
        codes = sorted(pool.map(lambda _: c.post("/api/v1/chips", json=doc).status_code, range(16)))
    assert codes == [200] * 15 + [201]
    with service.client() as c:
        assert [r["revision"] for r in c.get(f"/api/v1/chips/race-{uid}").json()["revisions"]] == [1]


BAD_INPUTS = [
    # (what, mutate(doc) -> body, expected status, expected loc, text in message)
    ("array mismatch", lambda d: {**d, "array": {"rows": 16, "cols": 32}}, 422, ["body", "array"], "does not match"),
    (
        "row out of range",
        lambda d: {**d, "faults": [{"row": 32, "col": 0, "site": "pe"}]},
        422,
        ["body", "faults", 0, "row"],
        "out of range",
    ),
    (
        "bit out of range",
        lambda d: {**d, "faults": [EXAMPLE_FAULTS[0], {"row": 1, "col": 1, "site": "weight", "bit": 9, "stuck": 0}]},
        422,
        ["body", "faults", 1, "bit"],
        "9 out of range 0..7",
    ),
    (
        "psum bit 32",
        lambda d: {**d, "faults": [{"row": 1, "col": 1, "site": "psum", "bit": 32, "stuck": 0}]},
        422,
        ["body", "faults", 0, "bit"],
        "0..31",
    ),
    (
        "bad site",
        lambda d: {**d, "faults": [{"row": 1, "col": 1, "site": "mac", "bit": 1, "stuck": 0}]},
        422,
        ["body", "faults", 0, "site"],
        "mac",
    ),
    (
        "duplicate fault",
        lambda d: {**d, "faults": [EXAMPLE_FAULTS[0], EXAMPLE_FAULTS[1], EXAMPLE_FAULTS[0]]},
        422,
        ["body", "faults", 2],
        "duplicate",
    ),
    (
        "stuck 2",
        lambda d: {**d, "faults": [{"row": 1, "col": 1, "site": "act", "bit": 1, "stuck": 2}]},
        422,
        ["body", "faults", 0, "stuck"],
        "0 or 1",
    ),
    (
        "string row",
        lambda d: {**d, "faults": [{"row": "1", "col": 1, "site": "pe"}]},
        422,
        ["body", "faults", 0, "row"],
        "integer",
    ),
    (
        "boolean bit",
        lambda d: {**d, "faults": [{"row": 1, "col": 1, "site": "act", "bit": True, "stuck": 1}]},
        422,
        ["body", "faults", 0, "bit"],
        "integer",
    ),
    ("faults not a list", lambda d: {**d, "faults": {"row": 1}}, 422, ["body", "faults"], "list"),
    ("fault not an object", lambda d: {**d, "faults": [7]}, 422, ["body", "faults", 0], "object"),
    ("unknown accelerator", lambda d: {**d, "accelerator": "no-such-profile"}, 422, ["body", "accelerator"], "unknown"),
    ("missing chip_id", lambda d: {k: v for k, v in d.items() if k != "chip_id"}, 422, ["body", "chip_id"], "required"),
    ("unknown field", lambda d: {**d, "colour": "red"}, 422, ["body", "colour"], "unknown field"),
    ("wafer not int", lambda d: {**d, "wafer": "7"}, 422, ["body", "wafer"], "int"),
    ("array missing", lambda d: {k: v for k, v in d.items() if k != "array"}, 422, ["body", "array"], "rows"),
    ("not an object", lambda d: [d], 422, ["body"], "object"),
    ("huge wafer", lambda d: {**d, "wafer": 10**30}, 422, ["body", "wafer"], "range"),
]


@pytest.mark.parametrize("what,mutate,status,loc,text", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_fault_maps_are_rejected_and_nothing_is_written(
    service: Any, accelerator: str, uid: str, what: str, mutate: Any, status: int, loc: list[Any], text: str
) -> None:
    cid = f"bad-{uid}"
    body = mutate(_map(cid, accelerator))
    with service.client() as c:
        r = c.post("/api/v1/chips", json=body)
        assert r.status_code == status, r.text
        err = r.json()
        assert isinstance(err["detail"], str) and text in err["detail"], err
        assert err["errors"][0]["loc"] == loc, err
        assert c.get(f"/api/v1/chips/{cid}").status_code == 404


@pytest.mark.parametrize(
    "raw,text",
    [
        (b'{"chip_id": ', "malformed JSON"),
        (b"", "empty"),
        (b"\xff\xfe{}", "UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "JSON"),
        (b"NaN", "object"),
    ],
    ids=["truncated", "empty", "not-utf8", "deep-nesting", "nan"],
)
def test_malformed_bodies(service: Any, raw: bytes, text: str) -> None:
    with service.client() as c:
        r = c.post("/api/v1/chips", content=raw, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
    assert text in r.json()["detail"]


def test_body_size_limit(service: Any, accelerator: str, uid: str) -> None:
    doc = _map(f"big-{uid}", accelerator, lot="x" * (2 << 20))
    with service.client() as c:
        r = c.post("/api/v1/chips", json=doc)
        assert r.status_code == 413 and "limit" in r.json()["detail"]

        # without Content-Length (chunked): still cut off at the limit
        def chunks() -> Any:
            for _ in range(64):
                yield b" " * 65536

        r = c.post("/api/v1/chips", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert c.get(f"/api/v1/chips/big-{uid}").status_code == 404


def test_bulk_ndjson_10k(service: Any, accelerator: str, uid: str, make_map: Any) -> None:
    n = 10_000
    maps = [make_map(f"B{uid}-{i:05d}", accelerator, seed=i, lot=f"LB{uid}", wafer=i % 4) for i in range(n)]
    lines = [json.dumps(m) for m in maps]
    bad = {
        17: "{not json",
        4242: json.dumps({**maps[4242], "array": {"rows": 31, "cols": 32}}),
        9999: json.dumps({**maps[9999], "faults": [{"row": 0, "col": 0, "site": "weight", "bit": 8, "stuck": 0}]}),
    }
    for i, text in bad.items():
        lines[i] = text
    body = ("\n".join(lines) + "\n").encode()
    with service.client(timeout=120) as c:
        r = c.post("/api/v1/chips/bulk", content=body, headers={"content-type": "application/x-ndjson"})
        assert r.status_code == 200, r.text[:2000]
        res = r.json()
        assert (res["lines_total"], res["created"], res["rejected"], res["unchanged"]) == (n, n - 3, 3, 0)
        rejected = {x["line"]: x for x in res["lines"] if x["status"] == "rejected"}
        assert sorted(rejected) == [18, 4243, 10000]  # 1-based line numbers
        assert "malformed JSON" in rejected[18]["errors"][0]["msg"]
        assert rejected[4243]["errors"][0]["loc"] == ["line", 4243, "array"]
        assert rejected[10000]["errors"][0]["loc"] == ["line", 10000, "faults", 0, "bit"]
        assert rejected[10000]["chip_id"] == f"B{uid}-09999"

        # the same upload again: every valid line unchanged; a changed map is rejected, or replaced
        lines[5] = json.dumps({**maps[5], "faults": maps[5]["faults"][1:]})
        body = ("\n".join(lines) + "\n").encode()
        res = c.post("/api/v1/chips/bulk", content=body).json()
        assert (res["created"], res["unchanged"], res["rejected"]) == (0, n - 4, 4)
        assert "replace=true" in res["lines"][5]["errors"][0]["msg"]
        res = c.post("/api/v1/chips/bulk", params={"replace": "true"}, content=lines[5].encode()).json()
        assert res["replaced"] == 1 and res["lines"][0]["revision"] == 2

        # filters + cursor pagination walk every chip of the lot exactly once
        seen: list[str] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"lot": f"LB{uid}", "wafer": 1, "limit": 500}
            if cursor:
                params["cursor"] = cursor
            page = c.get("/api/v1/chips", params=params).json()
            seen += [x["chip_id"] for x in page["items"]]
            assert all(x["wafer"] == 1 and x["lot"] == f"LB{uid}" for x in page["items"])
            cursor = page["next_cursor"]
            if not cursor:
                break
        expected = {m["chip_id"] for i, m in enumerate(maps) if i % 4 == 1 and i not in bad}
        assert len(seen) == len(set(seen)) and set(seen) == expected
        by_profile = c.get("/api/v1/chips", params={"accelerator": accelerator, "limit": 1000}).json()
        assert len(by_profile["items"]) == 1000 and by_profile["next_cursor"]
        assert c.get("/api/v1/chips", params={"cursor": "garbage!"}).status_code == 422


def test_bulk_duplicates_inside_one_request(service: Any, accelerator: str, uid: str, make_map: Any) -> None:
    a = make_map(f"D{uid}", accelerator, seed=1)
    b = make_map(f"D{uid}", accelerator, seed=2)
    body = "\n".join(json.dumps(x) for x in (a, a, b)).encode()
    with service.client() as c:
        res = c.post("/api/v1/chips/bulk", content=body).json()
    assert [x["status"] for x in res["lines"]] == ["created", "unchanged", "rejected"]


def test_bulk_empty_and_blank_lines(service: Any, accelerator: str, uid: str, make_map: Any) -> None:
    with service.client() as c:
        r = c.post("/api/v1/chips/bulk", content=b"\n\n")
        assert r.status_code == 400 and r.json()["detail"]
        body = (json.dumps(make_map(f"E{uid}", accelerator)) + "\n\n").encode()
        res = c.post("/api/v1/chips/bulk", content=body).json()
        assert [x["status"] for x in res["lines"]] == ["created", "rejected"]


@pytest.mark.parametrize(
    "field,value",
    [
        ("chip_id", "a\x00b"),
        ("lot", "L\x00"),
        ("accelerator", "sa\x00"),
        ("chip_id", "x\ny"),
        ("chip_id", "x\ud800y"),
        ("lot", "\udc00"),
    ],
    ids=["nul-chip", "nul-lot", "nul-accel", "newline-chip", "surrogate-chip", "surrogate-lot"],
)
def test_control_characters_are_4xx_not_500(service: Any, accelerator: str, uid: str, field: str, value: str) -> None:
    doc = _map(f"ctl-{uid}", accelerator)
    doc[field] = value
    with service.client() as c:
        body = json.dumps(doc).encode()  # ASCII: escapes lone surrogates as JSON allows
        r = c.post("/api/v1/chips", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", field], r.text
        assert c.post("/api/v1/chips/bulk", content=body).json()["rejected"] == 1


def test_odd_paths_and_queries_are_4xx(service: Any) -> None:
    with service.client() as c:
        for path in ("/api/v1/chips/a%00b", "/api/v1/accelerators/x%00", "/api/v1/jobs/j%00"):
            r = c.get(path)
            assert r.status_code in (404, 422), (path, r.status_code, r.text)
            assert r.json()["detail"]
        for params in ({"lot": "a\x00"}, {"wafer": "abc"}, {"limit": 0}):
            r = c.get("/api/v1/chips", params=params)
            assert 400 <= r.status_code < 500 or r.json()["items"] == [], (params, r.text)
        assert c.put("/api/v1/chips").status_code == 405
