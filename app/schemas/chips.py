from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.schemas.common import UTCDateTime

# The request body of POST /chips is parsed by hand (speed, and FaultMap's own field-naming
# errors); this JSON schema documents it in OpenAPI.
FAULT_MAP_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["chip_id", "accelerator", "array"],
    "additionalProperties": False,
    "properties": {
        "chip_id": {"type": "string", "maxLength": 128},
        "accelerator": {"type": "string", "description": "name of a registered accelerator profile"},
        "array": {
            "type": "object",
            "properties": {"rows": {"type": "integer"}, "cols": {"type": "integer"}},
            "required": ["rows", "cols"],
        },
        "faults": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["row", "col", "site"],
                "properties": {
                    "row": {"type": "integer"},
                    "col": {"type": "integer"},
                    "site": {"enum": ["pe", "weight", "act", "psum"]},
                    "bit": {"type": "integer"},
                    "stuck": {"enum": [0, 1]},
                },
            },
        },
        "lot": {"type": "string"},
        "wafer": {"type": "integer"},
        "die_x": {"type": "integer"},
        "die_y": {"type": "integer"},
    },
    "example": {
        "chip_id": "L042-W07-X12Y03",
        "accelerator": "sa32-int8",
        "array": {"rows": 32, "cols": 32},
        "faults": [
            {"row": 3, "col": 7, "site": "psum", "bit": 21, "stuck": 1},
            {"row": 9, "col": 0, "site": "weight", "bit": 6, "stuck": 0},
            {"row": 12, "col": 30, "site": "pe"},
        ],
        "lot": "L042",
        "wafer": 7,
        "die_x": 12,
        "die_y": 3,
    },
}

IngestStatus = Literal["created", "unchanged", "replaced", "rejected"]


class ChipSummary(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    chip_id: str
    accelerator: str
    lot: str | None
    wafer: int | None
    die_x: int | None
    die_y: int | None
    revision: int
    content_hash: str
    faults_digest: str
    n_faults: int
    fault_rate: float
    created_at: UTCDateTime
    updated_at: UTCDateTime


class ChipIngested(ChipSummary):
    status: IngestStatus
    assignment_job: str | None = Field(
        default=None, description="the job trying a new chip on an executed plan's models, when there is one"
    )


class RevisionOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    revision: int
    content_hash: str
    faults_digest: str
    n_faults: int
    fault_rate: float
    created_at: UTCDateTime
    fault_map: dict[str, Any]


class ChipDetail(ChipSummary):
    fault_map: dict[str, Any]
    revisions: list[RevisionOut]


class ChipPage(BaseModel):
    items: list[ChipSummary]
    next_cursor: str | None = Field(default=None, description="pass as ?cursor= to get the next page; null on the last")


class BulkLine(BaseModel):
    line: int
    status: IngestStatus
    chip_id: str | None = None
    revision: int | None = None
    errors: list[dict[str, Any]] | None = None


class BulkResult(BaseModel):
    lines_total: int
    created: int
    unchanged: int
    replaced: int
    rejected: int
    lines: list[BulkLine]
    assignment_job: str | None = Field(default=None, description="the first of assignment_jobs")
    assignment_jobs: list[str] | None = Field(
        default=None,
        description="jobs trying the new chips on an executed plan's models: one per 1000 lines that brought any",
    )
