from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _utc(v: datetime | None) -> datetime | None:
    # SQLite gives back naive datetimes; every stored timestamp is UTC.
    if v is not None and v.tzinfo is None:
        return v.replace(tzinfo=UTC)
    return v


# Every integer the API takes is bounded by what stores it: ids and chip coordinates are 32-bit
# database columns (SQLite raises OverflowError past 2**63, PostgreSQL DataError past 2**31),
# seeds feed numpy/torch generators (< 2**32).
INT32_MAX = 2**31 - 1
INT32_MIN = -(2**31)
SEED_MAX = 2**32 - 1

Int32 = Annotated[int, Field(ge=INT32_MIN, le=INT32_MAX)]
Seed = Annotated[int, Field(ge=0, le=SEED_MAX, description=f"random seed, 0..{SEED_MAX}")]


class StrictInput(BaseModel):
    """Base of request bodies: unknown fields are errors, and no type coercion (`true` is not 1, "3" is not 3)."""

    model_config = ConfigDict(extra="forbid", strict=True)


UTCDateTime = Annotated[datetime, AfterValidator(_utc)]
OptUTCDateTime = Annotated[datetime | None, AfterValidator(_utc)]


class ErrorItem(BaseModel):
    loc: list[str | int]
    msg: str


class ErrorBody(BaseModel):
    detail: str
    errors: list[ErrorItem] = Field(default_factory=list)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": desc}
    for code, desc in (
        (400, "Malformed request (e.g. invalid JSON)"),
        (401, "Missing or unknown API key"),
        (403, "API key lacks the required scope"),
        (404, "Not found"),
        (409, "Conflict with the stored state"),
        (413, "Request body too large"),
        (422, "Invalid input; `errors` names the offending field or line"),
    )
}
