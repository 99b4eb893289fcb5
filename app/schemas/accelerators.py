from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from accelerator.faults import NUMBER_FORMATS
from app.schemas.common import UTCDateTime


class AcceleratorIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", examples=["sa32-int8"])
    rows: int = Field(ge=1, le=4096, examples=[32])
    cols: int = Field(ge=1, le=4096, examples=[32])
    fmt: str = Field(default="int8", description=f"number format, one of {sorted(NUMBER_FORMATS)}")
    bypass: bool = Field(default=True, description="the array can skip dead PEs (fault-aware pruning)")


class AcceleratorOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    rows: int
    cols: int
    fmt: str
    bypass: bool
    created_at: UTCDateTime
