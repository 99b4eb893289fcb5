"""Hostile input the probe of issue 19 found answered with 500s or accepted wrongly, over a real server."""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any
from urllib.parse import quote, unquote

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


def _map(chip_id: str, accelerator: str) -> dict[str, Any]:
    faults = [{"row": 1, "col": 2, "site": "weight", "bit": 3, "stuck": 1}]
    return {"chip_id": chip_id, "accelerator": accelerator, "array": {"rows": 32, "cols": 32}, "faults": faults}


@pytest.mark.parametrize(
    "chip_id, says",
    [
        ("zw-a\u200bb", "U+200B"),  # zero-width space: a different chip that looks the same
        ("bidi-\u202eab", "U+202E"),
        ("nbsp-a\u00a0b", "U+00A0"),
        ("pua-\ue000", "U+E000"),
        ("ls-a\u2028b", "U+2028"),
        ("a/b", "'/'"),
        ("a\\b", "'\\'"),
        ("..", "path segment"),
        (".", "path segment"),
        (" lead", "whitespace"),
        ("trail ", "whitespace"),
        ("x" * 129, "128"),
    ],
)
def test_chip_ids_that_cannot_be_addressed_are_refused(service: Any, accelerator: str, chip_id: str, says: str) -> None:
    with service.client() as c:
        r = c.post("/api/v1/chips", json=_map(chip_id, accelerator))
        assert r.status_code == 422, r.text
        assert r.json()["errors"][0]["loc"] == ["body", "chip_id"] and says in r.json()["detail"], r.text
        body = json.dumps(_map(chip_id, accelerator)) + "\n"
        r = c.post("/api/v1/chips/bulk", content=body, headers={"Content-Type": "application/x-ndjson"})
        assert r.status_code == 200 and r.json()["rejected"] == 1, r.text
        assert r.json()["lines"][0]["errors"][0]["loc"] == ["line", 1, "chip_id"]
        assert c.get("/api/v1/chips", params={"accelerator": accelerator}).json()["items"] == []


def test_nfc_and_nfd_spellings_are_one_chip(service: Any, accelerator: str, uid: str) -> None:
    nfd, nfc = f"caf-{uid}-e\u0301", f"caf-{uid}-\u00e9"
    assert unicodedata.normalize("NFC", nfd) == nfc
    with service.client() as c:
        r = c.post("/api/v1/chips", json=_map(nfd, accelerator))
        assert r.status_code == 201 and r.json()["chip_id"] == nfc, r.text
        r = c.post("/api/v1/chips", json=_map(nfc, accelerator))
        assert r.status_code == 200 and r.json()["status"] == "unchanged", r.text
        body = json.dumps(_map(nfd, accelerator)) + "\n" + json.dumps(_map(nfc, accelerator)) + "\n"
        r = c.post("/api/v1/chips/bulk", content=body, headers={"Content-Type": "application/x-ndjson"})
        assert [line["status"] for line in r.json()["lines"]] == ["unchanged", "unchanged"], r.text
        for spelling in (nfd, nfc):
            r = c.get(f"/api/v1/chips/{quote(spelling)}")
            assert r.status_code == 200 and r.json()["chip_id"] == nfc, r.text
            r = c.get(f"/api/v1/chips/{quote(spelling)}/model")  # found, but has no model yet
            assert r.status_code in (404, 409) and "no chip" not in r.json()["detail"], r.text
        items = c.get("/api/v1/chips", params={"accelerator": accelerator}).json()["items"]
        assert [i["chip_id"] for i in items] == [nfc]


@pytest.mark.parametrize("chip_id", ['q"uote', "芯片-1", "back`tick;semi", "a b", "Ω≈ç√", "%41", "a?b#c", "..x"])
def test_chip_ids_with_quotes_and_non_latin1_round_trip(service: Any, accelerator: str, uid: str, chip_id: str) -> None:
    chip_id = f"{uid}-{chip_id}"
    with service.client() as c:
        r = c.post("/api/v1/chips", json=_map(chip_id, accelerator))
        assert r.status_code == 201, r.text
        r = c.get(f"/api/v1/chips/{quote(chip_id, safe='')}")
        assert r.status_code == 200 and r.json()["chip_id"] == chip_id, r.text


@pytest.mark.parametrize(
    "filename, fallback",
    [
        ('q"uote-model.safetensors', "q_uote-model.safetensors"),
        ("芯片-1-model.safetensors", "__-1-model.safetensors"),
        ("café-manifest.json", "cafe-manifest.json"),
        ("a\\b;c=d-model.safetensors", "a_b_c_d-model.safetensors"),
    ],
)
def test_content_disposition_is_rfc5987_with_an_ascii_fallback(filename: str, fallback: str) -> None:
    from app.api.routes.downloads import content_disposition

    header = content_disposition(filename)
    header.encode("ascii")  # what every HTTP stack can carry; a chip id outside Latin-1 was a 500
    assert header.startswith(f'attachment; filename="{fallback}"; ')
    ext = re.fullmatch(r"attachment; filename=\"[^\"\\]*\"; filename\*=UTF-8''([A-Za-z0-9%!#$&+.^_`|~-]+)", header)
    assert ext is not None, header  # RFC 5987 ext-value: attr-chars and %XX only
    assert unquote(ext.group(1), encoding="utf-8", errors="strict") == filename
