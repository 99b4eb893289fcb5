"""Content-addressed artifact store: model files, deltas, manifests, uploads; keyed by sha256.

Two backends behind one small interface, chosen by `FAULTFLEET_ARTIFACT_BACKEND`:
- `local` (default): a directory, `<artifact_dir>/<aa>/<sha256>`; workers on other
  machines need it on a shared volume.
- `database`: 1 MiB chunks in the `artifact_chunks` table, so every worker that reaches
  the service database (PostgreSQL at scale) shares artifacts with no extra storage.

Blobs are immutable and stored once: putting the same bytes twice is a no-op, so an
idempotent task that re-runs after a crash never duplicates an artifact.

Training checkpoints are scratch files, not blobs: with the `database` backend they are kept
per job in `checkpoint_files` (replaced every epoch, deleted when the job ends; see
`workers/checkpoints.py`); with `local` they stay in `<artifact_dir>/checkpoints`, which is
then already the shared volume.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import Engine, delete, func, insert, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.config import Settings, get_settings
from app.db.base import utcnow
from app.db.models import Artifact, ArtifactChunk, CheckpointFile

CHUNK = 1 << 20  # bytes: unit of hashing, storing and streaming


class BlobStore(Protocol):
    def put(self, sha256: str, data: bytes) -> str: ...

    def iter_chunks(self, sha256: str) -> Iterator[bytes]: ...

    def exists(self, sha256: str) -> bool: ...


def _check_digest(sha256: str) -> str:
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError(f"not a sha256 digest: {sha256!r}")
    return sha256


class LocalBlobStore:
    """Blobs as files under `root`, written atomically (temp file + rename)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, sha256: str) -> Path:
        return self.root / _check_digest(sha256)[:2] / sha256

    def put(self, sha256: str, data: bytes) -> str:
        target = self.path(sha256)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        return f"file://{target}"

    def iter_chunks(self, sha256: str) -> Iterator[bytes]:
        with open(self.path(sha256), "rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).exists()


class DatabaseBlobStore:
    """Blobs as ordered chunks in `artifact_chunks`; written in one transaction."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def put(self, sha256: str, data: bytes) -> str:
        if not self.exists(sha256):
            rows = [
                {"sha256": sha256, "seq": i, "data": data[o : o + CHUNK]}
                for i, o in enumerate(range(0, max(len(data), 1), CHUNK))
            ]
            try:
                with self.engine.begin() as conn:
                    conn.execute(insert(ArtifactChunk), rows)
            except IntegrityError:  # another worker stored the same bytes first
                pass
        return f"db://artifact_chunks/{sha256}"

    def iter_chunks(self, sha256: str) -> Iterator[bytes]:
        # One chunk per query: a large model streams without being held in memory.
        seq = 0
        while True:
            with self.engine.connect() as conn:
                data = conn.execute(
                    select(ArtifactChunk.data).where(ArtifactChunk.sha256 == sha256, ArtifactChunk.seq == seq)
                ).scalar_one_or_none()
            if data is None:
                return
            yield bytes(data)
            seq += 1

    def exists(self, sha256: str) -> bool:
        with self.engine.connect() as conn:
            n = conn.execute(select(func.count()).where(ArtifactChunk.sha256 == sha256)).scalar_one()
        return bool(n)


def get_store(settings: Settings | None = None, engine: Engine | None = None) -> BlobStore:
    settings = settings or get_settings()
    if settings.artifact_backend == "database":
        if engine is None:
            from app.db.session import get_engine

            engine = get_engine()
        return DatabaseBlobStore(engine)
    assert settings.artifact_dir is not None
    return LocalBlobStore(settings.artifact_dir)


def store_bytes(
    session: Session, data: bytes, kind: str, media_type: str, meta: dict[str, Any] | None = None
) -> Artifact:
    """Store `data` once and return its committed `Artifact` row (an existing row is reused).

    The bytes are written first (idempotent, content-addressed), the row second: a crash in
    between leaves an unreferenced blob, never a row without its bytes.
    """
    sha = hashlib.sha256(data).hexdigest()
    location = get_store().put(sha, data)
    row = session.scalars(select(Artifact).where(Artifact.sha256 == sha)).first()
    if row is not None:
        return row
    row = Artifact(sha256=sha, size=len(data), kind=kind, media_type=media_type, location=location, meta=meta or {})
    try:
        with session.begin_nested():
            session.add(row)
        session.commit()
    except IntegrityError:  # a concurrent worker registered it: use theirs
        session.rollback()
        row = session.scalars(select(Artifact).where(Artifact.sha256 == sha)).one()
    return row


def iter_artifact(sha256: str) -> Iterator[bytes]:
    """The artifact's bytes in chunks of at most 1 MiB (streaming downloads)."""
    return get_store().iter_chunks(sha256)


def read_artifact(sha256: str) -> bytes:
    """The whole artifact in memory (for small blobs: model weights, manifests)."""
    return b"".join(iter_artifact(sha256))


@contextlib.contextmanager
def open_artifact_file(sha256: str, suffix: str = "") -> Iterator[Path]:
    """A temporary local copy of the artifact named `*<suffix>` (loaders dispatch on suffixes)."""
    fd, tmp = tempfile.mkstemp(prefix="faultfleet-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in iter_artifact(sha256):
                f.write(chunk)
        yield Path(tmp)
    finally:
        os.unlink(tmp)


# --- job checkpoints (backend `database`) -----------------------------------------------------


def shares_checkpoints(settings: Settings) -> bool:
    """Whether checkpoints must go through the database: with `local`, `artifact_dir` is the
    shared store already (workers on many machines mount it), so they stay files there."""
    return settings.artifact_backend == "database"


def put_checkpoint(engine: Engine, key: str, name: str, data: bytes) -> None:
    """Store (or replace) file `name` of job checkpoint `key`: one row per file, an upsert."""
    upsert = postgresql_insert if engine.dialect.name == "postgresql" else sqlite_insert
    values = {"size": len(data), "data": data, "updated_at": utcnow()}
    stmt = upsert(CheckpointFile).values(key=key, name=name, **values)
    with engine.begin() as conn:
        conn.execute(stmt.on_conflict_do_update(index_elements=["key", "name"], set_=values))


def checkpoint_names(engine: Engine, key: str) -> list[str]:
    with engine.connect() as conn:
        return list(
            conn.scalars(select(CheckpointFile.name).where(CheckpointFile.key == key).order_by(CheckpointFile.name))
        )


def read_checkpoint(engine: Engine, key: str, name: str) -> bytes | None:
    with engine.connect() as conn:
        data = conn.scalar(select(CheckpointFile.data).where(CheckpointFile.key == key, CheckpointFile.name == name))
    return None if data is None else bytes(data)


def delete_checkpoints(engine: Engine, key: str) -> int:
    """Drop every stored file of checkpoint `key`; returns how many there were."""
    with engine.begin() as conn:
        return int(conn.execute(delete(CheckpointFile).where(CheckpointFile.key == key)).rowcount)
