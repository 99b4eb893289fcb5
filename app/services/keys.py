from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.security import generate_key, hash_key, key_prefix, parse_scopes
from app.db.models import ApiKey


def create_key(session: Session, scopes: list[str] | str, name: str = "") -> tuple[str, ApiKey]:
    """Store a new key (hashed) and return the plain key, which is never shown again."""
    granted = parse_scopes(scopes)
    if not granted:
        raise ValueError("a key needs at least one scope")
    key = generate_key()
    row = ApiKey(prefix=key_prefix(key), key_hash=hash_key(key), scopes=" ".join(sorted(granted)), name=name)
    session.add(row)
    session.flush()
    return key, row


def ensure_local_admin_key(session: Session, settings: Settings) -> Path | None:
    """Embedded default: create an admin key on first run and write it to <var>/admin.key (0600).

    Returns the file's path when a key was created, None when the file already holds a key
    that the database knows.
    """
    path = settings.local_admin_key_file
    if path.exists():
        existing = path.read_text().strip()
        if existing and session.scalar(select(ApiKey.id).where(ApiKey.key_hash == hash_key(existing))):
            return None
    key, _ = create_key(session, ["admin"], name="local admin (embedded default)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return path
