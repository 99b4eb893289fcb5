"""A chip's assignment is one row per base model: written in one INSERT ... ON CONFLICT statement."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from app.db.base import Base
from app.db.models import ChipAssignment

pytest.importorskip("torch")
from workers.store import upsert_assignment  # noqa: E402


def test_upsert_assignment_inserts_once_then_updates(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'a.db'}")
    Base.metadata.create_all(engine)  # SQLite does not enforce the foreign keys here: no chips needed
    with Session(engine) as s:
        upsert_assignment(s, 7, 3, status="waiting", source="late", reason="no model yet")
        upsert_assignment(s, 7, 3, status="verified", source="late", accuracy=0.97, reason=None)
        upsert_assignment(s, 8, 3, status="needs_nothing", source="plan")
        s.commit()
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(ChipAssignment)) == 2
        a = s.scalars(select(ChipAssignment).where(ChipAssignment.chip_pk == 7)).one()
        assert (a.status, a.accuracy, a.reason, a.source) == ("verified", 0.97, None, "late")
    engine.dispose()
