"""`GET /plans/{id}` serves its chips and its groups in cursor pages, as `GET /chips` does."""

from __future__ import annotations

import random
from typing import Any

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from app.db.base import Base
from app.db.models import AcceleratorProfile, GroupRecord, ModelRecord, PlanRecord
from app.services.plans import PLAN_CHIP_FIELDS, plan_chips_page, plan_groups_page


def _doc(chip_ids: list[str]) -> dict[str, Any]:
    return {"chips": [{"chip_id": c, "status": "needs_nothing", "screening": 0.9, "extra": 1} for c in chip_ids]}


def _groups(plan_id: int, n: int) -> list[GroupRecord]:
    """`n` groups, added out of their order (`index`)."""
    return [
        GroupRecord(
            plan_id=plan_id,
            index=i,
            key=f"g{i}",
            reason="initial",
            fused_map={},
            fused_digest="0" * 64,
            fused_rate=0.01,
            epochs=1,
        )
        for i in reversed(range(n))
    ]


def test_group_pages_cover_every_group_once_in_their_order(tmp_path: Any) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'g.db'}")
    Base.metadata.create_all(engine)  # SQLite does not enforce the foreign keys here
    with Session(engine) as s:
        s.add_all(_groups(1, 7) + _groups(2, 3))
        s.commit()
        seen: list[str] = []
        after = None
        for _ in range(10):
            page, after = plan_groups_page(s, 1, after, 3)
            assert len(page) <= 3
            seen += [g.key for g in page]
            if after is None:
                break
        assert seen == [f"g{i}" for i in range(7)]
        assert [g.key for g in plan_groups_page(s, 2, None, None)[0]] == ["g0", "g1", "g2"]  # None: every group
        assert plan_groups_page(s, 2, None, 3)[1] is None  # a full last page has no cursor
        assert plan_groups_page(s, 3, None, 3) == ([], None)
    engine.dispose()


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
            s.flush()
            s.add_all(_groups(plan.id, 105))
            s.commit()
            plan_id = plan.id
    finally:
        engine.dispose()
    with service.client() as c:
        first = c.get(f"/api/v1/plans/{plan_id}")
        assert first.status_code == 200, first.text
        body = first.json()
        assert len(body["chips"]) == 100 and body["next_cursor"] and body["model"] == f"pp-{uid}"
        assert [g["key"] for g in body["groups"]] == [f"g{i}" for i in range(100)] and body["next_groups_cursor"]
        seen = [ch["chip_id"] for ch in body["chips"]]
        cursor = body["next_cursor"]
        while cursor is not None:
            r = c.get(f"/api/v1/plans/{plan_id}", params={"limit": 70, "cursor": cursor})
            assert r.status_code == 200, r.text
            assert len(r.json()["chips"]) <= 70
            seen += [ch["chip_id"] for ch in r.json()["chips"]]
            cursor = r.json()["next_cursor"]
        assert seen == ids
        keys, cursor = [], None
        for _ in range(10):
            page = c.get(f"/api/v1/plans/{plan_id}", params={"groups_limit": 40, "groups_cursor": cursor or []})
            assert page.status_code == 200, page.text
            keys += [g["key"] for g in page.json()["groups"]]
            assert len(page.json()["chips"]) == 100  # each list pages on its own
            cursor = page.json()["next_groups_cursor"]
            if cursor is None:
                break
        assert keys == [f"g{i}" for i in range(105)]
        r = c.get(f"/api/v1/plans/{plan_id}", params={"groups_cursor": body["next_cursor"]})  # a chips cursor
        assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["query", "groups_cursor"]
        assert c.get(f"/api/v1/plans/{plan_id}", params={"groups_limit": 0}).status_code == 422
        for bad in ("nonsense", "eyJhZnRlciI6IDV9"):  # the second is a chip-list cursor: {"after": 5}
            r = c.get(f"/api/v1/plans/{plan_id}", params={"cursor": bad})
            assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["query", "cursor"]
        assert c.get(f"/api/v1/plans/{plan_id}", params={"limit": 0}).status_code == 422


def test_the_cli_gathers_every_page_of_chips_and_of_groups() -> None:
    """`faultfleet plans show` and `models download --plan` see every group, not the first page."""
    from app.cli.fleet import get_plan

    chips, groups = [f"c{i}" for i in range(5)], [f"g{i}" for i in range(12)]

    class Api:  # serves 2 chips and 5 groups a page, each list with its own cursor
        def get(self, path: str, params: dict[str, Any]) -> dict[str, Any]:
            c0, g0 = int(params.get("cursor", 0)), int(params.get("groups_cursor", 0))
            return {
                "chips": [{"chip_id": c} for c in chips[c0 : c0 + 2]],
                "next_cursor": str(c0 + 2) if c0 + 2 < len(chips) else None,
                "groups": [{"key": g} for g in groups[g0 : g0 + 5]],
                "next_groups_cursor": str(g0 + 5) if g0 + 5 < len(groups) else None,
            }

    plan = get_plan(Api(), 1)  # type: ignore[arg-type]
    assert [c["chip_id"] for c in plan["chips"]] == chips and [g["key"] for g in plan["groups"]] == groups
    assert plan["next_cursor"] is None and plan["next_groups_cursor"] is None


def test_a_chip_state_carries_its_retraining_epochs_as_epochs() -> None:
    """`chips[].epochs` of `GET /plans/{id}` is the planner's `ChipState.epochs` (issue 17: no `amount`)."""
    from planner import ChipState

    state = ChipState("a", "planned", 0.5, 0.02, 3).to_dict()
    page, _ = plan_chips_page({"chips": [state]}, None, 10)
    assert page[0]["epochs"] == 3 and "amount" not in page[0]
