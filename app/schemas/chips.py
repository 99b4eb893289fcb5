from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.schemas.common import INT32_MAX, INT32_MIN, UTCDateTime

_INT32 = {"type": "integer", "minimum": INT32_MIN, "maximum": INT32_MAX}

# The request body of POST /chips is parsed by hand (speed, and FaultMap's own field-naming
# errors); this JSON schema documents it in OpenAPI.
FAULT_MAP_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["chip_id", "accelerator", "array"],
    "additionalProperties": False,
    "properties": {
        "chip_id": {"type": "string", "minLength": 1, "maxLength": 128},
        "accelerator": {"type": "string", "minLength": 1, "description": "name of a registered accelerator profile"},
        "array": {
            "type": "object",
            "description": "must equal the accelerator profile's rows x cols",
            "properties": {
                "rows": {"type": "integer", "minimum": 1, "maximum": 4096},
                "cols": {"type": "integer", "minimum": 1, "maximum": 4096},
            },
            "required": ["rows", "cols"],
        },
        "faults": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["row", "col", "site"],
                "additionalProperties": False,
                "description": "row < rows, col < cols; 'pe' (dead PE) takes no bit/stuck, the others need both; "
                "bit < 8 for weight/act, < 32 for psum (int8)",
                "properties": {
                    "row": {"type": "integer", "minimum": 0, "maximum": 4095},
                    "col": {"type": "integer", "minimum": 0, "maximum": 4095},
                    "site": {"enum": ["pe", "weight", "act", "psum"]},
                    "bit": {"type": "integer", "minimum": 0, "maximum": 31},
                    "stuck": {"type": "integer", "enum": [0, 1]},
                },
            },
        },
        "lot": {"type": "string", "maxLength": 64},
        "wafer": _INT32,
        "die_x": _INT32,
        "die_y": _INT32,
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
