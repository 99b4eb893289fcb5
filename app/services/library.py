"""The model library of a base model: every verified model later chips may run, and how many
chips each serves (rows written by the fleet jobs, see `workers.pipeline.LibraryModel`)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from accelerator.faults import FaultMap
from app.db.models import ChipAssignment, LibraryModelRecord, ModelRecord


def library_view(session: Session, model: ModelRecord) -> dict[str, Any]:
    """The library of `model`: base first, then the robust base, then group models oldest first."""
    served = dict(
        session.execute(
            select(ChipAssignment.library_model_id, func.count())
            .where(ChipAssignment.base_model_id == model.id, ChipAssignment.library_model_id.is_not(None))
            .group_by(ChipAssignment.library_model_id)
        )
        .tuples()
        .all()
    )
    rows = list(session.scalars(select(LibraryModelRecord).where(LibraryModelRecord.base_model_id == model.id)))
    order = {"base": 0, "robust": 1, "group": 2}
    rows.sort(key=lambda r: (order.get(r.kind, 3), r.id))
    return {
        "model": model.name,
        "models": [
            {
                "key": r.key,
                "kind": r.kind,
                "group_id": r.group_id,
                "chips_served": int(served.get(r.id, 0)),
                "training_epochs": r.training_epochs,
                "protect_layer": r.protect_layer,
                "fused_map_digest": FaultMap.from_dict(r.fused_map).digest if r.fused_map else None,
                "sha256": r.artifact.sha256,
                "created_at": r.created_at,
            }
            for r in rows
        ],
        "chips_served": int(sum(served.values())),
    }
