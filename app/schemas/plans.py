"""Schemas of base models, plans, resilience maps and group models (the fleet retraining API)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic.config import JsonDict

from app.schemas.chips import normalize_chip_id
from app.schemas.common import Int32, Seed, StrictInput, UTCDateTime
from app.schemas.jobs import JobOut

BUILTIN_DATASETS = ("digits", "mnist5k")
SCHEDULES = ("progressive_union", "all_at_once", "sample_members")


class ModelTraining(StrictInput):
    """How a base model is trained on a worker: the settings `POST /models` takes besides its name,
    architecture, dataset and profile, and the one place of their defaults."""

    train: bool = Field(default=False, description="train the weights on a worker (JSON registration needs this)")
    epochs: int = Field(default=10, ge=1, le=500, description="float training epochs when train is true")
    lr: float = Field(default=0.05, gt=0, le=10)
    batch_size: int = Field(default=64, ge=1, le=8192)
    seed: Seed = 0


class ModelIn(ModelTraining):
    """Register a base model: a zoo architecture trained on a worker (`train: true`), or uploaded weights."""

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
    architecture: str = Field(description="zoo architecture: mlp, lenet5, resnet20, resnet32")
    dataset: str = Field(description="'digits', 'mnist5k', or the name of an uploaded .npz (multipart)")
    accelerator: str = Field(description="registered accelerator profile name")


class ModelConfig(ModelTraining):
    """A base model's stored `config` as the registration job reads it: its training settings
    (those given, the rest their defaults) and the artifacts it was uploaded with."""

    uploaded_weights_sha256: str | None = Field(default=None, description="uploaded weights (no training)")
    weights_suffix: str = Field(default=".safetensors", description="the uploaded weights file's format")
    dataset_sha256: str | None = Field(default=None, description="an uploaded .npz dataset")

    @classmethod
    def stored(cls, config: dict[str, Any] | None) -> ModelConfig:
        """Parse a stored config (JSON from the database: no strict types needed)."""
        return cls.model_validate(config or {}, strict=False)


class ModelOut(BaseModel):
    id: int
    name: str
    architecture: str
    dataset: str
    accelerator: str
    status: str
    error: str | None = Field(default=None, description="why registration failed (status failed)")
    baseline_accuracy: float | None
    weights_sha256: str | None
    config: dict[str, Any]
    created_at: UTCDateTime


class ModelAccepted(BaseModel):
    model: ModelOut
    job: JobOut


# "exactly one of max_drop / min_accuracy", as JSON Schema: one is a number, the other absent or null
_EXACTLY_ONE_CONSTRAINT: JsonDict = {
    "oneOf": [
        {"required": ["max_drop"], "properties": {"max_drop": {"type": "number"}, "min_accuracy": {"type": "null"}}},
        {
            "required": ["min_accuracy"],
            "properties": {"min_accuracy": {"type": "number"}, "max_drop": {"type": "null"}},
        },
    ]
}


class ConstraintIn(StrictInput):
    """Exactly one of `max_drop` (relative to the base model's accuracy) or `min_accuracy` (absolute)."""

    model_config = ConfigDict(json_schema_extra=_EXACTLY_ONE_CONSTRAINT)

    max_drop: float | None = Field(default=None, ge=0, le=1, description="at most this far below baseline (fraction)")
    min_accuracy: float | None = Field(default=None, ge=0, le=1, description="at least this accuracy (fraction)")

    @model_validator(mode="after")
    def _exactly_one(self) -> ConstraintIn:
        if (self.max_drop is None) == (self.min_accuracy is None):
            raise ValueError("give exactly one of max_drop or min_accuracy")
        return self


class ChipSelection(StrictInput):
    lot: str | None = None
    wafer: Int32 | None = None
    ids: list[Annotated[str, AfterValidator(normalize_chip_id)]] = Field(
        default_factory=list, max_length=100_000, description="chip ids (NFC and NFD spellings name the same chip)"
    )


class ResilienceGrid(StrictInput):
    rates: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        default=[0.01, 0.03, 0.06, 0.1], min_length=1, max_length=32, description="fault rates in (0, 1]"
    )
    epochs: list[Annotated[int, Field(ge=0, le=200)]] = Field(
        default=[0, 1, 2, 4], min_length=1, max_length=16, description="retraining epochs, 0..200"
    )
    samples: int = Field(default=2, ge=1, le=32)
    seed: Seed = 0


class TrainIn(StrictInput):
    lr: float = Field(default=0.01, gt=0, le=10)
    batch_size: int = Field(default=64, ge=1, le=8192)
    seed: Seed = 0
    epoch_fraction: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="the share of the train split one retraining epoch reads (a new random subset each epoch): "
        "a group's `epochs` and the map's cells count such epochs; the summary's `training_epochs_total` counts "
        "full passes. 0.25 makes the ladder's first rung a quarter pass (see bench/README.md)",
    )


class PlanParams(StrictInput):
    """A plan's settings: what `POST /plans` takes besides the model, the constraint and the chips.
    Stored as the plan's `params` and parsed from there by its jobs: the one place of their defaults."""

    max_group_size: int = Field(
        default=1,
        ge=1,
        le=256,
        description="chips sharing one retraining (TRE-Map's fused maps); 1: every chip no library model serves "
        "is retrained alone, which cost least on every fleet measured at a one-point constraint (bench/README.md)",
    )
    schedule: Literal["progressive_union", "all_at_once", "sample_members"] = "progressive_union"
    bypass: bool = Field(
        default=True,
        description="deploy a chip with faulty PEs bypassed (fault-aware pruning) where that screens better; "
        "needs an accelerator profile with bypass support",
    )
    resilience: ResilienceGrid = Field(default_factory=ResilienceGrid)
    resilience_map: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="measure the resilience map over `resilience` (on), climb its epochs as a ladder by "
        "verification with no map (off), or measure it only where it is predicted to pay (auto)",
    )
    map_cells: Literal["adaptive", "full"] = Field(
        default="adaptive",
        description="which cells of a measured map are trained: only those the plan's failing chips' "
        "retraining epochs depend on (adaptive: near the constraint's contour, at the rates the fleet has; "
        "the map's other cells are null), or every cell of `resilience` (full, cached per model and grid)",
    )
    robust_base: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="train a fault-robust base model on the fleet's own maps for the library (on), never (off), "
        "or where it is predicted to save more retraining than it costs (auto)",
    )
    climb: Literal["bounded", "full"] = Field(
        default="bounded",
        description="how verification climbs the epochs ladder for a chip retrained alone after a miss: "
        "bounded stops a climb its own accuracies predict cannot reach the constraint and climbs again "
        "protected from the first rung; full climbs every rung, then protected at the top (FAP+T's)",
    )
    train: TrainIn = Field(default_factory=TrainIn)
    seed: Seed = 0

    @classmethod
    def stored(cls, params: dict[str, Any] | None) -> PlanParams:
        """Parse a plan's stored `params` (JSON from the database: no strict types needed)."""
        return cls.model_validate(params or {}, strict=False)


class PlanIn(PlanParams):
    model: str = Field(description="base model name")
    constraint: ConstraintIn
    chips: ChipSelection = Field(default_factory=ChipSelection, description="empty: every chip of the profile")

    def params(self) -> dict[str, Any]:
        """The plan's settings as its row stores them (`PlanParams`)."""
        return self.model_dump(include=set(PlanParams.model_fields))


class MemberOut(BaseModel):
    chip_id: str
    revision: int
    status: str
    accuracy: float | None
    reason: str | None


class GroupOut(BaseModel):
    id: int
    key: str
    round: int
    reason: str
    status: str
    members: list[MemberOut]
    epochs: int = Field(
        description="retraining epochs, each reading the plan's train.epoch_fraction of the train split "
        "(a chip's `epochs` in `chips` counts the same epochs)"
    )
    schedule: str | None
    fused_rate: float
    fused_digest: str
    protect: bool
    protect_layer: str | None
    model_sha256: str | None
    manifest_sha256: str | None


class PlanOut(BaseModel):
    id: int
    model: str
    status: str
    error: str | None = Field(default=None, description="why planning or execution failed")
    constraint: dict[str, Any]
    selection: dict[str, Any]
    params: dict[str, Any]
    summary: dict[str, Any] | None
    resilience_map_id: int | None
    chips: list[dict[str, Any]] = Field(
        description="one page of the plan's chip states, in chip-id order (?limit=, ?cursor= as GET /chips)"
    )
    next_cursor: str | None = Field(
        default=None, description="pass as ?cursor= to get the next page of `chips`; null on the last"
    )
    groups: list[GroupOut] = Field(
        description="one page of the plan's groups, in their order (?groups_limit=, ?groups_cursor=; "
        "the first page without them)"
    )
    next_groups_cursor: str | None = Field(
        default=None, description="pass as ?groups_cursor= to get the next page of `groups`; null on the last"
    )
    jobs: dict[str, str]
    created_at: UTCDateTime


class PlanAccepted(BaseModel):
    plan: PlanOut
    job: JobOut


class ResilienceMapOut(BaseModel):
    id: int
    status: str
    base_model_id: int
    params: dict[str, Any]
    training_epochs: int | None
    map: dict[str, Any] | None


class LibraryModelOut(BaseModel):
    key: str = Field(description="'base', 'robust', or 'plan<id>:<group key>'")
    kind: Literal["base", "robust", "group"]
    group_id: int | None
    chips_served: int = Field(description="chips whose assignment runs this model")
    training_epochs: int = Field(description="epochs trained to make it (0 for the base)")
    protect_layer: str | None
    fused_map_digest: str | None
    sha256: str
    created_at: UTCDateTime


class LibraryOut(BaseModel):
    model: str
    models: list[LibraryModelOut]
    chips_served: int
