from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Response
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from app.api.deps import SessionDep, require
from app.api.errors import ApiError
from app.db.base import utcnow
from app.db.models import AcceleratorProfile
from app.schemas.accelerators import AcceleratorIn, AcceleratorOut
from app.schemas.common import ERROR_RESPONSES

router = APIRouter(prefix="/accelerators", tags=["accelerators"], responses=ERROR_RESPONSES)


def _same(row: AcceleratorProfile, body: AcceleratorIn) -> bool:
    return (row.rows, row.cols, row.fmt, row.bypass) == (body.rows, body.cols, body.fmt, body.bypass)


@router.post(
    "",
    status_code=201,
    response_model=AcceleratorOut,
    dependencies=[Depends(require("admin"))],
    summary="Register an accelerator profile (idempotent: the same profile again answers 200)",
    responses={200: {"model": AcceleratorOut, "description": "this profile was already registered, identically"}},
)
def create_accelerator(body: AcceleratorIn, session: SessionDep, response: Response) -> Any:
    from accelerator.faults import ArrayConfig

    try:
        ArrayConfig(body.rows, body.cols, body.fmt, body.bypass)
    except ValueError as exc:
        raise ApiError(422, str(exc), [{"loc": ["body", "fmt"], "msg": str(exc)}]) from None
    existing = session.scalar(select(AcceleratorProfile).where(AcceleratorProfile.name == body.name))
    if existing is None:
        row = AcceleratorProfile(**body.model_dump(), created_at=utcnow())
        session.add(row)
        try:
            session.commit()
            return row
        except IntegrityError:
            session.rollback()
            existing = session.scalar(select(AcceleratorProfile).where(AcceleratorProfile.name == body.name))
            assert existing is not None
    if _same(existing, body):
        response.status_code = 200
        return existing
    msg = (
        f"accelerator profile {body.name!r} already exists as {existing.rows}x{existing.cols} {existing.fmt} "
        f"bypass={existing.bypass}; profiles are immutable, register a new name"
    )
    raise ApiError(409, msg, [{"loc": ["body", "name"], "msg": msg}])


@router.get("", response_model=list[AcceleratorOut], dependencies=[Depends(require("read"))])
def list_accelerators(session: SessionDep) -> Any:
    return session.scalars(select(AcceleratorProfile).order_by(AcceleratorProfile.name)).all()


@router.get("/{name}", response_model=AcceleratorOut, dependencies=[Depends(require("read"))])
def get_accelerator(name: str, session: SessionDep) -> Any:
    row = session.scalar(select(AcceleratorProfile).where(AcceleratorProfile.name == name))
    if row is None:
        raise ApiError(404, f"no accelerator profile named {name!r}", [{"loc": ["path", "name"], "msg": "not found"}])
    return row
