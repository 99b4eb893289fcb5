"""SQLAlchemy 2 models: the schema that ``migrations/`` creates (a test keeps them equal)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.db.base import Base, utcnow

TS = DateTime(timezone=True)

# the predicate of uq_jobs_pending_late_chips: a late-chip job no worker has taken yet
PENDING_LATE_JOB = "kind = 'assign_chip' AND state = 'queued' AND attempts = 0"


class AcceleratorProfile(Base):
    """A registered accelerator: array size, number format, dead-PE bypass support."""

    __tablename__ = "accelerator_profiles"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    rows: Mapped[int] = mapped_column(Integer)
    cols: Mapped[int] = mapped_column(Integer)
    fmt: Mapped[str] = mapped_column(String(16))
    bypass: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(TS, default=utcnow)


class Artifact(Base):
    """A content-addressed blob (model weights, manifest, delta, checkpoint)."""

    __tablename__ = "artifacts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    size: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(32))
    media_type: Mapped[str] = mapped_column(String(128))
    location: Mapped[str] = mapped_column(Text, doc="URI of the stored bytes, e.g. file:///... or db:")
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(TS, default=utcnow)


class ModelRecord(Base):
    """A pretrained network that chips of one accelerator profile run."""

    __tablename__ = "base_models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    architecture: Mapped[str] = mapped_column(String(64))
    dataset: Mapped[str] = mapped_column(String(64))
    accelerator_id: Mapped[int] = mapped_column(ForeignKey("accelerator_profiles.id"), index=True)
    weights_artifact_id: Mapped[int | None] = mapped_column(ForeignKey("artifacts.id"))
    baseline_accuracy: Mapped[float | None] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    error: Mapped[str | None] = mapped_column(Text, doc="why its registration job failed (status failed)")
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(TS, default=utcnow)

    accelerator: Mapped[AcceleratorProfile] = relationship()
    weights: Mapped[Artifact | None] = relationship()


class Chip(Base):
    """One fabricated chip; ``fault_map`` is its current revision (history in ``chip_revisions``)."""

    __tablename__ = "chips"
    __table_args__ = (Index("ix_chips_lot_wafer", "lot", "wafer"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    chip_id: Mapped[str] = mapped_column(String(128), unique=True)
    accelerator_id: Mapped[int] = mapped_column(ForeignKey("accelerator_profiles.id"), index=True)
    lot: Mapped[str | None] = mapped_column(String(64))
    wafer: Mapped[int | None] = mapped_column(Integer)
    die_x: Mapped[int | None] = mapped_column(Integer)
    die_y: Mapped[int | None] = mapped_column(Integer)
    revision: Mapped[int] = mapped_column(Integer, default=1)
    content_hash: Mapped[str] = mapped_column(String(64), doc="sha256 of the canonical fault-map document")
    faults_digest: Mapped[str] = mapped_column(String(64), doc="FaultMap.digest: array + faults, metadata excluded")
    n_faults: Mapped[int] = mapped_column(Integer)
    fault_rate: Mapped[float] = mapped_column(Float)
    fault_map: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(TS, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(TS, default=utcnow)

    accelerator: Mapped[AcceleratorProfile] = relationship()
    revisions: Mapped[list[ChipRevision]] = relationship(
        back_populates="chip", order_by="ChipRevision.revision", cascade="all, delete-orphan"
    )


class ChipRevision(Base):
    """Every fault map a chip ever had; revision 1 is the first POST, ``?replace=true`` adds one."""

    __tablename__ = "chip_revisions"
    __table_args__ = (UniqueConstraint("chip_pk", "revision"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    chip_pk: Mapped[int] = mapped_column(ForeignKey("chips.id", ondelete="CASCADE"))
    revision: Mapped[int] = mapped_column(Integer)
    content_hash: Mapped[str] = mapped_column(String(64))
    faults_digest: Mapped[str] = mapped_column(String(64))
    n_faults: Mapped[int] = mapped_column(Integer)
    fault_rate: Mapped[float] = mapped_column(Float)
    fault_map: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(TS, default=utcnow)

    chip: Mapped[Chip] = relationship(back_populates="revisions")


class Job(Base):
    """Long work run by a Celery worker. The table, not the broker, is the source of truth.

    A worker *claims* a job with a conditional update (queued, or running with a stale
    heartbeat) and gets a fresh ``lease``; every later write is conditional on that lease, so a
    duplicate delivery or a worker that was presumed dead can never overwrite a newer attempt.
    """

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_state_heartbeat_at", "state", "heartbeat_at"),
        # at most one pending (queued, never started) late-chip job per subject ('late-chips:<accelerator id>'):
        # chips that arrive meanwhile join it (app.services.plans.late_assignment_jobs)
        Index(
            "uq_jobs_pending_late_chips",
            "subject",
            unique=True,
            postgresql_where=text(PENDING_LATE_JOB),
            sqlite_where=text(PENDING_LATE_JOB),
        ),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(64), index=True)
    state: Mapped[str] = mapped_column(String(16), default="queued")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str] = mapped_column(Text, default="")
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    checkpoint: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease: Mapped[str | None] = mapped_column(String(32))
    worker: Mapped[str | None] = mapped_column(String(255), doc="Celery node name of the worker running it")
    worker_host: Mapped[str | None] = mapped_column(
        String(255), doc="host, boot and PID namespace of the process running it (where worker_pid means something)"
    )
    worker_pid: Mapped[int | None] = mapped_column(Integer, doc="PID of the process running it, on worker_host")
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), index=True)
    subject: Mapped[str | None] = mapped_column(
        String(64), index=True, doc="what the job works on, e.g. 'plan:12', 'group:7', 'model:3'"
    )
    created_by: Mapped[str | None] = mapped_column(String(16), doc="key prefix of the API key that created it")
    created_at: Mapped[datetime] = mapped_column(TS, default=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column(TS)
    started_at: Mapped[datetime | None] = mapped_column(TS)
    heartbeat_at: Mapped[datetime | None] = mapped_column(TS)
    finished_at: Mapped[datetime | None] = mapped_column(TS)


class WorkerHeartbeat(Base):
    """A worker process's sign of life, written by its recovery sweep (what /readyz reports)."""

    __tablename__ = "worker_heartbeats"

    id: Mapped[str] = mapped_column(String(255), primary_key=True, doc="nodename/host/pid: one row per process")
    nodename: Mapped[str] = mapped_column(String(255))
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(TS, default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(TS, default=utcnow, index=True)
    stopped_at: Mapped[datetime | None] = mapped_column(TS)


class PlanRecord(Base):
    """A retraining plan for chips of one base model (built and executed by jobs)."""

    __tablename__ = "plans"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"), index=True)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    error: Mapped[str | None] = mapped_column(Text, doc="why its planning or execution job failed")
    constraint: Mapped[dict[str, Any]] = mapped_column(JSON)
    selection: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    document: Mapped[dict[str, Any] | None] = mapped_column(
        JSON, doc="the planner's Plan (planner.Plan.to_dict): groups, chip states, resilience map, severity"
    )
    resilience_map_id: Mapped[int | None] = mapped_column(ForeignKey("resilience_maps.id"))
    created_at: Mapped[datetime] = mapped_column(TS, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(TS, default=utcnow)

    base_model: Mapped[ModelRecord] = relationship()
    groups: Mapped[list[GroupRecord]] = relationship(back_populates="plan", order_by="GroupRecord.index")


class GroupRecord(Base):
    """Chips of a plan that share one retraining on their fused fault map."""

    __tablename__ = "plan_groups"
    __table_args__ = (UniqueConstraint("plan_id", "index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    plan_id: Mapped[int] = mapped_column(ForeignKey("plans.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    key: Mapped[str] = mapped_column(
        String(32), default="", server_default="", doc="the planner's group id, e.g. 'r0-g000003'"
    )
    round: Mapped[int] = mapped_column(Integer, default=0, server_default="0", doc="0: initial plan; n: n-th replan")
    reason: Mapped[str] = mapped_column(
        String(32), default="grouped", server_default="grouped", doc="grouped, alone, smaller_group, ..."
    )
    protect: Mapped[bool] = mapped_column(
        Boolean, default=False, server_default=false(), doc="most sensitive layer runs fault-free (TMR)"
    )
    protect_layer: Mapped[str | None] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    fused_map: Mapped[dict[str, Any]] = mapped_column(JSON)
    fused_digest: Mapped[str] = mapped_column(String(64))
    fused_rate: Mapped[float] = mapped_column(Float)
    epochs: Mapped[int] = mapped_column(
        Integer,
        default=0,
        doc="retraining epochs, each of the plan's train.epoch_fraction of the train split (planner.Group.epochs)",
    )
    schedule: Mapped[str | None] = mapped_column(String(32))
    predicted_cost: Mapped[float | None] = mapped_column(Float)
    model_artifact_id: Mapped[int | None] = mapped_column(ForeignKey("artifacts.id"))
    manifest_artifact_id: Mapped[int | None] = mapped_column(ForeignKey("artifacts.id"))
    delta_artifact_id: Mapped[int | None] = mapped_column(ForeignKey("artifacts.id"))
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"))
    created_at: Mapped[datetime] = mapped_column(TS, default=utcnow)

    plan: Mapped[PlanRecord] = relationship(back_populates="groups")
    model: Mapped[Artifact | None] = relationship(foreign_keys=[model_artifact_id])
    manifest: Mapped[Artifact | None] = relationship(foreign_keys=[manifest_artifact_id])
    delta: Mapped[Artifact | None] = relationship(foreign_keys=[delta_artifact_id])
    members: Mapped[list[GroupMember]] = relationship(back_populates="group", cascade="all, delete-orphan")


class GroupMember(Base):
    """A chip (at one fault-map revision) in a group, with its verification outcome."""

    __tablename__ = "group_members"
    __table_args__ = (UniqueConstraint("group_id", "chip_pk"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    group_id: Mapped[int] = mapped_column(ForeignKey("plan_groups.id", ondelete="CASCADE"))
    chip_pk: Mapped[int] = mapped_column(ForeignKey("chips.id"), index=True)
    chip_revision: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    accuracy: Mapped[float | None] = mapped_column(Float)
    reason: Mapped[str | None] = mapped_column(Text)

    group: Mapped[GroupRecord] = relationship(back_populates="members")
    chip: Mapped[Chip] = relationship()


class ApiKey(Base):
    """An API key: only its sha256 is stored (keys are 256-bit random, so a fast hash is safe)."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prefix: Mapped[str] = mapped_column(String(16), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[str] = mapped_column(String(128), doc="space-separated: ingest plan read admin")
    name: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[datetime] = mapped_column(TS, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(TS)


class ArtifactChunk(Base):
    """Bytes of an artifact when the artifact backend is the database (1 MiB chunks, in order)."""

    __tablename__ = "artifact_chunks"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class CheckpointFile(Base):
    """A training checkpoint file of a running job, kept in the database when the artifact
    backend is the database, so a job taken over on another machine resumes where it stopped
    (`workers/checkpoints.py`). One row per file of the job's checkpoint directory, replaced
    after every epoch and deleted when the job finishes: scratch, not an artifact."""

    __tablename__ = "checkpoint_files"

    key: Mapped[str] = mapped_column(String(128), primary_key=True, doc="the job's checkpoint name, e.g. group-12")
    name: Mapped[str] = mapped_column(String(128), primary_key=True, doc="file name in that directory")
    size: Mapped[int] = mapped_column(BigInteger)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    updated_at: Mapped[datetime] = mapped_column(TS, default=utcnow)


class ResilienceMapRecord(Base):
    """A measured resilience map, cached per (base model weights, dataset, array, grid, training)."""

    __tablename__ = "resilience_maps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True, doc="sha256 of what the map was measured for")
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"), index=True)
    accelerator_id: Mapped[int] = mapped_column(ForeignKey("accelerator_profiles.id"))
    status: Mapped[str] = mapped_column(String(16), default="building")
    error: Mapped[str | None] = mapped_column(Text, doc="why building it failed (status failed)")
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    document: Mapped[dict[str, Any] | None] = mapped_column(JSON, doc="planner.ResilienceMap.to_dict()")
    training_epochs: Mapped[int | None] = mapped_column(
        Integer, doc="retraining epochs trained to measure it, each of meta.train.epoch_fraction of the train split"
    )
    created_at: Mapped[datetime] = mapped_column(TS, default=utcnow)


class ChipAssignment(Base):
    """The model a chip must run for one base model: a group's, the pruned base model's, or none (reason)."""

    __tablename__ = "chip_assignments"
    __table_args__ = (UniqueConstraint("chip_pk", "base_model_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    chip_pk: Mapped[int] = mapped_column(ForeignKey("chips.id", ondelete="CASCADE"), index=True)
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"))
    plan_id: Mapped[int | None] = mapped_column(ForeignKey("plans.id"))
    group_id: Mapped[int | None] = mapped_column(ForeignKey("plan_groups.id"))
    artifact_id: Mapped[int | None] = mapped_column(ForeignKey("artifacts.id"))
    status: Mapped[str] = mapped_column(
        String(16), doc="verified, needs_nothing, unrecoverable, or waiting (late chip, for the next plan)"
    )
    source: Mapped[str] = mapped_column(String(8), default="plan", doc="plan, or late (assigned after the plan ran)")
    accuracy: Mapped[float | None] = mapped_column(Float)
    reason: Mapped[str | None] = mapped_column(Text)
    bypass: Mapped[str | None] = mapped_column(
        String(16), doc="bypass policy the chip is deployed with (accelerator.faults.BYPASS_POLICIES), null: none"
    )
    library_model_id: Mapped[int | None] = mapped_column(
        ForeignKey("library_models.id"), index=True, doc="the library model the chip runs (null: none yet)"
    )
    test_accuracy: Mapped[float | None] = mapped_column(Float, doc="on the test split, which no decision saw")
    updated_at: Mapped[datetime] = mapped_column(TS, default=utcnow)

    artifact: Mapped[Artifact | None] = relationship()
    group: Mapped[GroupRecord | None] = relationship()
    library_model: Mapped[LibraryModelRecord | None] = relationship()


class LibraryModelRecord(Base):
    """A verified model of one base model that later chips may run without retraining:
    the base itself, its fault-robust version, or a group's retrained model."""

    __tablename__ = "library_models"
    __table_args__ = (UniqueConstraint("base_model_id", "key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id", ondelete="CASCADE"), index=True)
    key: Mapped[str] = mapped_column(String(64), doc="'base', 'robust', or 'plan<id>:<group key>'")
    kind: Mapped[str] = mapped_column(String(16), doc="base, robust, or group")
    artifact_id: Mapped[int] = mapped_column(ForeignKey("artifacts.id"), doc="the weights (safetensors)")
    group_id: Mapped[int | None] = mapped_column(ForeignKey("plan_groups.id", ondelete="SET NULL"))
    fused_map: Mapped[dict[str, Any] | None] = mapped_column(JSON, doc="a group model's fused map")
    protect_layer: Mapped[str | None] = mapped_column(String(128))
    training_epochs: Mapped[int] = mapped_column(Integer, default=0, doc="epochs trained to make it")
    created_at: Mapped[datetime] = mapped_column(TS, default=utcnow)

    artifact: Mapped[Artifact] = relationship()
