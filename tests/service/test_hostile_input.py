"""Hostile input the probe of issue 19 found answered with 500s or accepted wrongly, over a real server."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.integration

HUGE = str(2**64)


@pytest.mark.parametrize(
    "path",
    [
        f"/api/v1/plans/{HUGE}",
        f"/api/v1/resilience-maps/{HUGE}",
        f"/api/v1/resilience-maps/{HUGE}/plot.png",
        f"/api/v1/groups/{HUGE}/model",
        f"/api/v1/plans/{2**31}",
        "/api/v1/plans/0",
        f"/api/v1/chips?wafer={HUGE}",
        f"/api/v1/chips?limit={HUGE}",
    ],
)
def test_out_of_range_integers_are_422(service: Any, path: str) -> None:
    with service.client() as c:
        r = c.get(path)
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["loc"][0] in ("path", "query")


def test_out_of_range_integers_in_bodies_are_422(service: Any, accelerator: str, uid: str) -> None:
    with service.client() as c:
        r = c.post(f"/api/v1/plans/{HUGE}/execute")
        assert r.status_code == 422, r.text
        r = c.post("/api/v1/fleet/stats", json={"wafer": 2**63})
        assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "wafer"], r.text
        r = c.post("/api/v1/plans", json={"model": "m", "constraint": {"max_drop": 0.1}, "chips": {"wafer": 2**40}})
        assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "chips", "wafer"], r.text
        r = c.post("/api/v1/plans", json={"model": "m", "constraint": {"max_drop": 0.1}, "seed": 2**32})
        assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "seed"], r.text


@pytest.mark.parametrize("model", ["³", "٣", "99999999999999999999999", "-1"])
def test_model_lookup_by_non_ascii_digits_or_huge_id_is_404(service: Any, model: str) -> None:
    with service.client() as c:
        r = c.get(f"/api/v1/models/{model}")
    assert r.status_code == 404, r.text


@pytest.mark.parametrize(
    "body, field",
    [
        ({"rows": True, "cols": 4}, "rows"),
        ({"rows": 4, "cols": 4.0}, "cols"),
        ({"rows": "4", "cols": 4}, "rows"),
        ({"rows": 4, "cols": 4, "bypass": 1}, "bypass"),
        ({"rows": 4, "cols": 4, "bypass": "true"}, "bypass"),
        ({"rows": 4, "cols": 4, "fmt": "fp8"}, "fmt"),
    ],
)
def test_accelerator_fields_are_strict(service: Any, uid: str, body: dict[str, Any], field: str) -> None:
    with service.client() as c:
        r = c.post("/api/v1/accelerators", json={"name": f"strict-{uid}", **body})
        assert r.status_code == 422, r.text
        assert r.json()["errors"][0]["loc"] == ["body", field], r.text
        assert c.get(f"/api/v1/accelerators/strict-{uid}").status_code == 404  # nothing written


def test_strict_booleans_in_plan_and_model_bodies(service: Any, accelerator: str, uid: str) -> None:
    with service.client() as c:
        r = c.post("/api/v1/plans", json={"model": "m", "constraint": {"max_drop": 0.1}, "bypass": 1})
        assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "bypass"], r.text
        r = c.post(
            "/api/v1/models",
            json={
                "name": f"m{uid}",
                "architecture": "mlp",
                "dataset": "digits",
                "accelerator": accelerator,
                "train": 1,
            },
        )
        assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "train"], r.text
        r = c.post(
            "/api/v1/models",
            json={
                "name": f"m{uid}",
                "architecture": "mlp",
                "dataset": "digits",
                "accelerator": accelerator,
                "train": True,
                "epochs": "2",
            },
        )
        assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "epochs"], r.text


def test_openapi_states_what_the_server_enforces(service: Any) -> None:
    with service.client() as c:
        doc = c.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    one_of = schemas["ConstraintIn"]["oneOf"]
    assert [b["required"] for b in one_of] == [["max_drop"], ["min_accuracy"]]
    assert schemas["AcceleratorIn"]["properties"]["fmt"]["enum"] == ["int8"]
    body = doc["paths"]["/api/v1/models"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    assert body["application/json"]["schema"]["properties"]["train"] == {
        "const": True,
        "description": "JSON registers by training",
    }
    assert body["multipart/form-data"]["schema"]["properties"]["weights"]["format"] == "binary"
    params = doc["paths"]["/api/v1/plans/{plan_id}"]["get"]["parameters"]
    assert params[0]["schema"]["maximum"] == 2**31 - 1
    fmt = doc["paths"]["/api/v1/groups/{group_id}/model"]["get"]["parameters"]
    assert {"safetensors", "manifest", "delta"} == set(next(p for p in fmt if p["name"] == "format")["schema"]["enum"])
