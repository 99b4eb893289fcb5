from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.schemas.common import Int32, OptUTCDateTime, StrictInput, UTCDateTime

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class Progress(BaseModel):
    fraction: float
    message: str


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    kind: str
    state: JobState
    progress: Progress
    params: dict[str, Any]
    result: dict[str, Any] | None
    error: str | None
    attempts: int
    subject: str | None
    created_at: UTCDateTime
    started_at: OptUTCDateTime
    finished_at: OptUTCDateTime
    heartbeat_at: OptUTCDateTime


class FleetStatsIn(StrictInput):
    lot: str | None = None
    wafer: Int32 | None = None
    accelerator: str | None = None
    batch_size: int = Field(default=500, ge=1, le=10_000)
    throttle_s: float = Field(default=0.0, ge=0.0, le=10.0, description="pause between batches (s)")
