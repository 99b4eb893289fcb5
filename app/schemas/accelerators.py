from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator

from accelerator.faults import NUMBER_FORMATS
from app.schemas.common import StrictInput, UTCDateTime

_FORMATS: list[JsonValue] = list(sorted(NUMBER_FORMATS))


class AcceleratorIn(StrictInput):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", examples=["sa32-int8"])
    rows: int = Field(ge=1, le=4096, examples=[32])
    cols: int = Field(ge=1, le=4096, examples=[32])
    # an enum in the OpenAPI document, checked against the registry (formats may be added at run time)
    fmt: str = Field(default="int8", description="number format", json_schema_extra={"enum": _FORMATS})
    bypass: bool = Field(default=True, description="the array can skip dead PEs (fault-aware pruning)")

    @field_validator("fmt")
    @classmethod
    def _known_format(cls, v: str) -> str:
        if v not in NUMBER_FORMATS:
            raise ValueError(f"unknown number format {v!r}; known: {sorted(NUMBER_FORMATS)}")
        return v


class AcceleratorOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    rows: int
    cols: int
    fmt: str
    bypass: bool
    created_at: UTCDateTime
