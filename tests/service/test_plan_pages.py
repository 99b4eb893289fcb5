"""`GET /plans/{id}` serves its chips in cursor pages, as `GET /chips` does."""

from __future__ import annotations

import random
from typing import Any

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from app.db.models import AcceleratorProfile, ModelRecord, PlanRecord
from app.services.plans import PLAN_CHIP_FIELDS, plan_chips_page


def _doc(chip_ids: list[str]) -> dict[str, Any]:
    return {"chips": [{"chip_id": c, "status": "needs_nothing", "screening": 0.9, "extra": 1} for c in chip_ids]}


def test_pages_cover_every_chip_once_in_chip_id_order() -> None:
    ids = [f"C{i:04d}" for i in range(23)]
    random.Random(0).shuffle(ids)
    doc = _doc(ids)
    seen: list[str] = []
    after = None
    for _ in range(10):
        page, after = plan_chips_page(doc, after, 5)
        assert len(page) <= 5 and all(set(ch) == set(PLAN_CHIP_FIELDS) for ch in page)
        seen += [ch["chip_id"] for ch in page]
        if after is None:
            break
    assert seen == sorted(ids)


def test_the_last_full_page_has_no_cursor_and_an_empty_plan_one_empty_page() -> None:
    page, after = plan_chips_page(_doc(["a", "b"]), None, 2)
    assert [c["chip_id"] for c in page] == ["a", "b"] and after is None
    assert plan_chips_page({}, None, 10) == ([], None)
    assert plan_chips_page(_doc(["a", "b"]), "zz", 10) == ([], None)


@pytest.mark.integration
def test_get_plan_pages_its_chips(service: Any, accelerator: str, uid: str) -> None:
    ids = [f"pp-{uid}-{i:03d}" for i in range(250)]
    engine = create_engine(service.database_url)
    try:
        with Session(engine) as s:
            prof = s.scalar(select(AcceleratorProfile.id).where(AcceleratorProfile.name == accelerator))
            assert prof is not None
            bm = ModelRecord(name=f"pp-{uid}", architecture="mlp", dataset="digits", accelerator_id=prof, config={})
            s.add(bm)
            s.flush()
            plan = PlanRecord(base_model_id=bm.id, status="planned", constraint={}, document=_doc(ids[::-1]))
            s.add(plan)
            s.commit()
            plan_id = plan.id
    finally:
        engine.dispose()
    with service.client() as c:
        first = c.get(f"/api/v1/plans/{plan_id}")
        assert first.status_code == 200, first.text
        body = first.json()
        assert len(body["chips"]) == 100 and body["next_cursor"] and body["model"] == f"pp-{uid}"
        seen = [ch["chip_id"] for ch in body["chips"]]
        cursor = body["next_cursor"]
        while cursor is not None:
            r = c.get(f"/api/v1/plans/{plan_id}", params={"limit": 70, "cursor": cursor})
            assert r.status_code == 200, r.text
            assert len(r.json()["chips"]) <= 70
            seen += [ch["chip_id"] for ch in r.json()["chips"]]
            cursor = r.json()["next_cursor"]
        assert seen == ids
        for bad in ("nonsense", "eyJhZnRlciI6IDV9"):  # the second is a chip-list cursor: {"after": 5}
            r = c.get(f"/api/v1/plans/{plan_id}", params={"cursor": bad})
            assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["query", "cursor"]
        assert c.get(f"/api/v1/plans/{plan_id}", params={"limit": 0}).status_code == 422
