"""Opaque cursors for keyset pagination: ``?cursor=`` carries the key of the last item served."""

from __future__ import annotations

import base64
import json
from typing import TypeVar

from app.services.errors import Invalid

K = TypeVar("K", int, str)


def encode_cursor(after: int | str) -> str:
    return base64.urlsafe_b64encode(json.dumps({"after": after}).encode()).decode().rstrip("=")


def decode_cursor(cursor: str, kind: type[K], param: str = "cursor") -> K:
    """The key in `cursor`; `Invalid` (a 422 naming the query parameter `param`) for anything
    this API did not return."""
    try:
        pad = "=" * (-len(cursor) % 4)
        after = json.loads(base64.urlsafe_b64decode(cursor + pad))["after"]
    except Exception:
        after = None
    if type(after) is not kind:
        raise Invalid("invalid cursor", errors=[{"loc": ["query", param], "msg": "not a cursor this API returned"}])
    return after
