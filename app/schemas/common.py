from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field


def _utc(v: datetime | None) -> datetime | None:
    # SQLite gives back naive datetimes; every stored timestamp is UTC.
    if v is not None and v.tzinfo is None:
        return v.replace(tzinfo=UTC)
    return v


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
