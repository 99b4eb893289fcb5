"""Content-addressed artifact store: local directory and PostgreSQL-backed blobs."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.db.models import Artifact, ArtifactChunk
from app.services import artifacts as store
from workers.export import apply_delta, sparse_delta


def test_local_store_is_content_addressed_and_streams_in_chunks(tmp_path: Path) -> None:
    s = store.LocalBlobStore(tmp_path)
    data = os.urandom(store.CHUNK * 2 + 17)
    sha = hashlib.sha256(data).hexdigest()
    loc = s.put(sha, data)
    assert loc.endswith(sha) and s.exists(sha)
    assert s.put(sha, data) == loc  # same bytes, same place, nothing rewritten
    chunks = list(s.iter_chunks(sha))
    assert [len(c) for c in chunks] == [store.CHUNK, store.CHUNK, 17] and b"".join(chunks) == data
    with pytest.raises(ValueError, match="not a sha256"):
        s.path("../../etc/passwd")


@pytest.mark.integration
def test_database_store_shares_blobs_through_postgres(pg_database: str, monkeypatch: Any) -> None:
    from app.db import migrate

    migrate.upgrade(pg_database)
    engine = create_engine(pg_database)
    monkeypatch.setattr(store, "get_settings", lambda: Settings(database_url=pg_database, artifact_backend="database"))
    monkeypatch.setattr("app.db.session.get_engine", lambda: engine)
    data = os.urandom(store.CHUNK + 5)
    with Session(engine) as s:
        a = store.store_bytes(s, data, "group_model", "application/octet-stream")
        b = store.store_bytes(s, data, "group_model", "application/octet-stream")
        assert a.id == b.id and a.sha256 == hashlib.sha256(data).hexdigest() and a.location.startswith("db://")
        assert s.scalar(select(func.count()).select_from(Artifact)) == 1
        assert s.scalar(select(func.count()).select_from(ArtifactChunk)) == 2
    assert store.read_artifact(a.sha256) == data
    with store.open_artifact_file(a.sha256, ".bin") as path:
        assert path.suffix == ".bin" and path.read_bytes() == data
    assert not path.exists()


def test_database_backend_is_refused_on_sqlite(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs PostgreSQL"):
        Settings(var_dir=tmp_path, artifact_backend="database")


def test_sparse_delta_rebuilds_the_model_exactly_and_only_stores_changes() -> None:
    torch.manual_seed(0)
    base = {"w": torch.randn(64, 64), "b": torch.zeros(64)}
    new = {k: v.clone() for k, v in base.items()}
    new["w"][3, :5] += 1.0
    new["extra"] = torch.ones(3)
    delta = sparse_delta(base, new)
    rebuilt = apply_delta(base, delta)
    assert set(rebuilt) == set(new) and all(torch.equal(rebuilt[k], new[k]) for k in new)
    assert len(delta) < 1000  # 5 changed entries + a 3-element tensor, not 4,160 floats
    assert sparse_delta(base, new) == delta  # deterministic bytes (stable sha256)
