"""Domain errors: what the service layer raises when a request cannot be served.

The service layer knows nothing of HTTP. Each kind here means one thing about the subject of
the request (it does not exist, it is in the wrong state, the input is invalid), and
`app.api.errors` maps each kind to its status code in one place.

Every error carries ``errors``: items ``{"loc": [...], "msg": str}`` naming what is wrong
(``loc`` as in FastAPI's validation errors: ``["body", "chips", "ids"]``, ``["path", "plan_id"]``),
and optional ``extra`` fields that the API adds to its answer.
"""

from __future__ import annotations

import re
from typing import Any


class DomainError(Exception):
    """A request the service refuses; `message` says why, `errors` says where."""

    def __init__(
        self,
        message: str,
        loc: list[str | int] | None = None,
        *,
        errors: list[dict[str, Any]] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.errors = errors if errors is not None else [{"loc": loc if loc is not None else [], "msg": message}]
        self.extra = extra


class NotFound(DomainError):
    """The subject (a model, plan, group, chip...) does not exist, or has nothing to serve yet."""

    @classmethod
    def of(cls, what: str, key: Any, loc: list[str | int]) -> NotFound:
        """The usual answer for an unknown key: "no plan 7"."""
        return cls(f"no {what} {key!r}", errors=[{"loc": loc, "msg": "not found"}])


class Conflict(DomainError):
    """The subject exists but its state forbids the request (a taken name, a model not ready yet)."""


class Invalid(DomainError):
    """The request's content is invalid (an unknown architecture, a selection that matches no chip)."""


_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def loc_from_field(field: str, root: str = "body") -> list[str | int]:
    """'faults[2].bit' -> ['body', 'faults', 2, 'bit']."""
    loc: list[str | int] = [root] if root else []
    for name, index in _PATH_PART.findall(field):
        loc.append(int(index) if index else name)
    return loc


def value_error_to_item(exc: Exception, root: str = "body") -> dict[str, Any]:
    """Turn `FaultMap.from_dict`'s "field: message" ValueError into an error item."""
    msg = str(exc) or type(exc).__name__
    field, sep, _rest = msg.partition(": ")
    if sep and " " not in field and field:
        return {"loc": loc_from_field(field, root), "msg": msg}
    return {"loc": [root] if root else [], "msg": msg}
