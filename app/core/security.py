"""API keys: random 256-bit tokens; only their sha256 is stored, scopes gate each route."""

from __future__ import annotations

import hashlib
import secrets

SCOPES: tuple[str, ...] = ("ingest", "plan", "read", "admin")
KEY_PREFIX = "ff_"


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    # A fast hash is the right tool for high-entropy random keys (no dictionary to attack);
    # it keeps per-request verification cheap. Passwords would need a slow KDF instead.
    return hashlib.sha256(key.encode()).hexdigest()


def key_prefix(key: str) -> str:
    return key[:11]


def parse_scopes(raw: str | list[str] | tuple[str, ...]) -> frozenset[str]:
    items = raw.replace(",", " ").split() if isinstance(raw, str) else list(raw)
    bad = [s for s in items if s not in SCOPES]
    if bad:
        raise ValueError(f"unknown scope(s) {bad}; known: {list(SCOPES)}")
    return frozenset(items)


def allows(granted: frozenset[str], needed: str) -> bool:
    return needed in granted or "admin" in granted
