"""Accelerator profiles. Profiles never change once stored, so lookups are cached per database."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from accelerator.faults import ArrayConfig
from app.db.models import AcceleratorProfile


@dataclass(frozen=True)
class ProfileInfo:
    id: int
    name: str
    array: ArrayConfig


_cache: dict[tuple[str, str], ProfileInfo] = {}
_lock = threading.Lock()


def _key(engine: Engine, name: str) -> tuple[str, str]:
    return (str(engine.url), name)


def get_profile(session: Session, name: str) -> ProfileInfo | None:
    key = _key(session.get_bind().engine, name)
    hit = _cache.get(key)
    if hit is not None:
        return hit
    row = session.scalar(select(AcceleratorProfile).where(AcceleratorProfile.name == name))
    if row is None:
        return None
    info = ProfileInfo(row.id, row.name, ArrayConfig(row.rows, row.cols, row.fmt, row.bypass))
    with _lock:
        _cache[key] = info
    return info


def get_profile_cached(name: str) -> ProfileInfo | None:
    """`get_profile` on the service database; a session is opened only when the profile is not cached."""
    from app.db.session import get_engine, get_sessionmaker

    hit = _cache.get(_key(get_engine(), name))
    if hit is not None:
        return hit
    with get_sessionmaker()() as s:
        return get_profile(s, name)


def profile_names(session: Session) -> dict[int, str]:
    return dict(session.execute(select(AcceleratorProfile.id, AcceleratorProfile.name)).tuples().all())


def all_profiles(session: Session) -> dict[str, ProfileInfo]:
    """Every profile by name (one query; the table is small)."""
    return {
        r.name: ProfileInfo(r.id, r.name, ArrayConfig(r.rows, r.cols, r.fmt, r.bypass))
        for r in session.scalars(select(AcceleratorProfile))
    }
