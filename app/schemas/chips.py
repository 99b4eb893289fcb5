from __future__ import annotations

import re
import unicodedata
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.schemas.common import INT32_MAX, INT32_MIN, UTCDateTime

_INT32 = {"type": "integer", "minimum": INT32_MIN, "maximum": INT32_MAX}

MAX_CHIP_ID = 128
CHIP_ID_RULES = (
    "1 to 128 characters, stored in Unicode NFC (an NFD spelling is the same chip); no control, format "
    "(zero-width, bidi), private-use, unassigned or surrogate code points, no line separators, no whitespace but "
    "the plain space and none at either end, no '/' or '\\', and not '.' or '..'"
)
_ASCII_BAD = re.compile(r"[\x00-\x1f\x7f/\\]")
# Unicode general categories refused in a chip id: invisible, or not a character anyone can type back
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def normalize_chip_id(chip_id: str) -> str:
    """The stored form of a chip id (NFC); use it for lookups too, so NFC and NFD spellings meet."""
    return chip_id if chip_id.isascii() else unicodedata.normalize("NFC", chip_id)


def chip_id_problem(chip_id: str) -> str | None:
    """Why `chip_id` (already normalized) cannot be a chip id, or None; see CHIP_ID_RULES."""
    if not chip_id:
        return "must not be empty"
    if len(chip_id) > MAX_CHIP_ID:
        return f"longer than {MAX_CHIP_ID} characters"
    if chip_id in (".", ".."):
        return f"{chip_id!r} is a path segment, not an id"
    if chip_id[0].isspace() or chip_id[-1].isspace():
        return "must not begin or end with whitespace"
    if chip_id.isascii():  # the common case: one regex
        return "must not contain control characters, '/' or '\\'" if _ASCII_BAD.search(chip_id) else None
    for ch in chip_id:
        cat = unicodedata.category(ch)
        if cat in _REFUSED_CATEGORIES or ch in "/\\" or (ch.isspace() and ch != " "):
            name = unicodedata.name(ch, "unnamed")
            return f"must not contain U+{ord(ch):04X} ({name}, Unicode category {cat})"
    return None


# The request body of POST /chips is parsed by hand (speed, and FaultMap's own field-naming
# errors); this JSON schema documents it in OpenAPI.
FAULT_MAP_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["chip_id", "accelerator", "array"],
    "additionalProperties": False,
    "properties": {
        "chip_id": {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_CHIP_ID,
            "pattern": r"^[^/\\\x00-\x1f\x7f]+$",
            "description": CHIP_ID_RULES,
        },
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
    assignment_job: str | None = Field(
        default=None,
        description="the job trying a new chip on an executed plan's models, when there is one: its "
        "accelerator's pending late-chip job, which every chip that arrives before a worker takes it joins",
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
        description="jobs trying the new chips on an executed plan's models: the pending late-chip job of "
        "each accelerator concerned (one job a chunk of 1000 lines joins, or a new one if a worker took it meanwhile)",
    )
