"""Database rows that service tests start from: a base model on an accelerator profile."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from app.db.models import AcceleratorProfile, ModelRecord


def base_model_row(
    s: Session, *, profile: str = "sa8", size: int = 8, status: str = "ready", **fields: Any
) -> ModelRecord:
    """Model "m" (mlp on digits) on a new `size` x `size` int8 profile with bypass, flushed so that
    plans, maps and chips can refer to it (the profile through `accelerator_id`)."""
    prof = AcceleratorProfile(name=profile, rows=size, cols=size, fmt="int8", bypass=True)
    s.add(prof)
    s.flush()
    bm = ModelRecord(name="m", architecture="mlp", dataset="digits", accelerator_id=prof.id, status=status, **fields)
    s.add(bm)
    s.flush()
    return bm
