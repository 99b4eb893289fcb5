"""Row readers and writers of the fleet jobs: base models (loaded and cached per process),
plans, groups, the model library, chip assignments, and the failure marks of job subjects.

Transactions are short on purpose: read what a step needs, close the session, compute
(seconds to minutes), then write in a new session. On SQLite every transaction holds the
database's write lock, so a session left open across training would stall the API.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from sqlalchemy import Engine, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from torch import nn

import accelerator as acc
from accelerator import ArrayConfig, FaultMap
from app.core.config import Settings, get_settings
from app.db.base import utcnow
from app.db.models import (
    AcceleratorProfile,
    Artifact,
    Chip,
    ChipAssignment,
    GroupMember,
    GroupRecord,
    LibraryModelRecord,
    ModelRecord,
    PlanRecord,
)
from app.schemas.plans import ModelConfig, PlanParams, TrainIn
from app.services.artifacts import open_artifact_file, read_artifact, store_bytes
from planner import Group, Plan
from workers import pipeline
from workers.export import manifest_bytes, plan_group_manifest, sparse_delta, state_dict_bytes

SAFETENSORS = "application/octet-stream"  # safetensors has no registered media type


# --- loading a base model, its stored settings --------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """What a base model row says, read in one short transaction."""

    id: int
    name: str
    architecture: str
    dataset: str
    config: ModelConfig
    array: ArrayConfig
    weights_sha256: str | None
    baseline: float | None
    accelerator_id: int


@dataclass(frozen=True)
class LoadedBaseModel:
    """A registered base model loaded in this worker: its calibrated weights, its dataset
    (`accelerator.Dataset`), the array it runs on and the torch device this worker runs it
    on (`worker_device`; the model itself stays on the CPU, the accelerator functions take
    it there and back). Not a deployment: that word means the map a chip runs a model with."""

    info: ModelInfo
    model: nn.Module
    data: Any
    device: str = "cpu"

    @property
    def array(self) -> ArrayConfig:
        return self.info.array

    def emulation(self, cfg: pipeline.TrainConfig) -> pipeline.Emulation:
        """This model's array and dataset as the fleet loop runs them (validation and test split)."""
        return pipeline.Emulation.of(self.array, self.data, cfg)


def profile_array(p: AcceleratorProfile) -> ArrayConfig:
    return ArrayConfig(p.rows, p.cols, p.fmt, p.bypass)


def model_info(engine: Engine, model_id: int) -> ModelInfo:
    with Session(engine, expire_on_commit=False) as s:
        bm = s.get(ModelRecord, model_id)
        if bm is None:
            raise ValueError(f"base model {model_id} not found")
        return ModelInfo(
            bm.id,
            bm.name,
            bm.architecture,
            bm.dataset,
            ModelConfig.stored(bm.config),
            profile_array(bm.accelerator),
            bm.weights.sha256 if bm.weights is not None else None,
            bm.baseline_accuracy,
            bm.accelerator_id,
        )


def load_state(sha256: str) -> dict[str, torch.Tensor]:
    """A state_dict stored as a safetensors artifact."""
    return safetensors_load(read_artifact(sha256))


def load_data(info: ModelInfo) -> Any:
    seed = info.config.seed
    sha = info.config.dataset_sha256
    if sha:  # a user-uploaded .npz, kept as an artifact
        with open_artifact_file(sha, ".npz") as path:
            return acc.load_dataset(info.dataset, path, seed=seed)
    return acc.load_dataset(info.dataset, seed=seed)


# Loading a dataset and a model takes seconds and every job of a plan needs the same one:
# keep the last few per worker process, keyed by weights digest (never stale).
_LOADED_BASE_MODELS: dict[tuple[int, str], LoadedBaseModel] = {}
_LOADED_BASE_MODELS_MAX = 4


def load_base_model(engine: Engine, model_id: int) -> LoadedBaseModel:
    """The registered base model loaded, ready to run (cached per process; the key includes its weights digest)."""
    info = model_info(engine, model_id)
    if info.weights_sha256 is None:
        raise ValueError(f"base model {model_id} is not ready")
    key = (model_id, info.weights_sha256)
    if key not in _LOADED_BASE_MODELS:
        data = load_data(info)
        model = acc.load_model(info.architecture, load_state(info.weights_sha256), data.input_shape, data.num_classes)
        while len(_LOADED_BASE_MODELS) >= _LOADED_BASE_MODELS_MAX:
            _LOADED_BASE_MODELS.pop(next(iter(_LOADED_BASE_MODELS)))
        _LOADED_BASE_MODELS[key] = LoadedBaseModel(info, model, data, worker_device(get_settings()))
    return _LOADED_BASE_MODELS[key]


def worker_device(settings: Settings) -> str:
    """The torch device this worker runs models on: FAULTFLEET_DEVICE, 'auto' resolved
    to the GPU when torch sees one. A GPU asked for and missing fails the job by name."""
    if settings.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if settings.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"FAULTFLEET_DEVICE={settings.device}, but torch sees no CUDA device on this worker")
    return settings.device


def train_config(params: PlanParams | TrainIn, device: str | None = None) -> pipeline.TrainConfig:
    """The retraining hyper-parameters of a plan (its `train` settings), or those a child job was given."""
    t = params.train if isinstance(params, PlanParams) else params
    return pipeline.TrainConfig(
        lr=t.lr, batch_size=t.batch_size, seed=t.seed, device=device, epoch_fraction=t.epoch_fraction
    )


def plan_settings(params: PlanParams) -> pipeline.FleetSettings:
    """A plan's `FleetSettings` from its parsed params; a grid of epoch 0 alone climbs the default ladder."""
    grid = params.resilience
    ladder = tuple(sorted({0, *grid.epochs}))
    return pipeline.FleetSettings(
        max_group_size=params.max_group_size,
        bypass=params.bypass,
        robust_base=params.robust_base,
        resilience_map=params.resilience_map,
        ladder=ladder if len(ladder) > 1 else pipeline.FleetSettings.ladder,
        map_rates=tuple(sorted(grid.rates)),
        map_samples=grid.samples,
        map_cells=params.map_cells,
        schedule=params.schedule,
        climb=params.climb,
        seed=params.seed,
    )


def load_group_model(loaded: LoadedBaseModel, sha256: str) -> nn.Module:
    return acc.load_model(
        loaded.info.architecture, load_state(sha256), loaded.data.input_shape, loaded.data.num_classes
    )


# --- a failed job marks its subject failed (in the transaction that fails the job) ----------------


def model_failed(params: dict[str, Any], error: str) -> Any:
    return update(ModelRecord).where(ModelRecord.id == int(params["model_id"])).values(status="failed", error=error)


def plan_failed(params: dict[str, Any], error: str) -> Any:
    return (
        update(PlanRecord)
        .where(PlanRecord.id == int(params["plan_id"]))
        .values(status="failed", error=error, updated_at=utcnow())
    )


# --- plan rows ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanInfo:
    """What a plan row says, read in one short transaction."""

    id: int
    base_model_id: int
    accelerator_id: int
    params: PlanParams
    constraint: dict[str, Any]
    selection: dict[str, Any]
    document: dict[str, Any] | None
    summary: dict[str, Any]


def plan_info(engine: Engine, plan_id: int) -> PlanInfo:
    with Session(engine, expire_on_commit=False) as s:
        p = s.get(PlanRecord, plan_id)
        if p is None:
            raise ValueError(f"plan {plan_id} not found")
        return PlanInfo(
            p.id,
            p.base_model_id,
            p.base_model.accelerator_id,
            PlanParams.stored(p.params),
            dict(p.constraint),
            dict(p.selection or {}),
            p.document,
            dict(p.summary or {}),
        )


def selected_maps(engine: Engine, plan: PlanInfo, array: ArrayConfig) -> list[FaultMap]:
    """The fault maps of the chips a plan covers: its selection (lot, wafer, ids) among its accelerator's chips."""
    sel = plan.selection
    q = select(Chip.fault_map).where(Chip.accelerator_id == plan.accelerator_id)
    if sel.get("lot") is not None:
        q = q.where(Chip.lot == sel["lot"])
    if sel.get("wafer") is not None:
        q = q.where(Chip.wafer == sel["wafer"])
    if sel.get("ids"):
        q = q.where(Chip.chip_id.in_(sel["ids"]))
    with Session(engine, expire_on_commit=False) as s:
        docs = list(s.scalars(q.order_by(Chip.chip_id)))
    return [FaultMap.from_dict(d, array=array) for d in docs]


def sync_groups(session: Session, plan: PlanRecord, doc: Plan) -> None:
    """Mirror the planner's groups and chip states into rows (idempotent: keyed by group id)."""
    rows = {g.key: g for g in session.scalars(select(GroupRecord).where(GroupRecord.plan_id == plan.id))}
    chips = {c.chip_id: c for c in session.scalars(select(Chip).where(Chip.chip_id.in_(list(doc.chips))))}
    next_index = max((g.index for g in rows.values()), default=-1) + 1
    for g in doc.groups:
        if g.group_id in rows:
            continue
        row = GroupRecord(
            plan_id=plan.id,
            index=next_index,
            key=g.group_id,
            round=g.round,
            reason=g.reason,
            protect=g.protect,
            fused_map=g.fused.to_dict(),
            fused_digest=g.fused.digest,
            fused_rate=g.fused.rate,
            epochs=g.epochs,
            schedule=g.schedule["name"],
            predicted_cost=float(g.epochs),
            status="pending",
        )
        next_index += 1
        session.add(row)
        session.flush()
        for c in g.members:
            session.add(GroupMember(group_id=row.id, chip_pk=chips[c].id, chip_revision=chips[c].revision))
        rows[g.group_id] = row
    session.flush()
    key_of = {r.id: k for k, r in rows.items()}
    chip_of = {c.id: c.chip_id for c in chips.values()}
    for m in session.scalars(select(GroupMember).join(GroupRecord).where(GroupRecord.plan_id == plan.id)):
        st, key = doc.chips[chip_of[m.chip_pk]], key_of[m.group_id]
        tried = next((h for h in st.history if h["group_id"] == key), None)
        if tried is None:
            continue
        m.accuracy = tried["accuracy"]
        if st.group_id == key and st.status in ("verified", "unrecoverable"):
            m.status, m.reason = st.status, st.reason
        else:
            m.status = "missed"
    plan.document = doc.to_dict()
    plan.summary = {**(plan.summary or {}), **doc.summary()}  # keeps the ledger and thresholds
    plan.updated_at = utcnow()


def set_plan_status(engine: Engine, plan_id: int, status: str) -> None:
    with Session(engine, expire_on_commit=False) as s:
        p = s.get(PlanRecord, plan_id)
        assert p is not None
        p.status, p.updated_at = status, utcnow()
        s.commit()


# --- the model library ------------------------------------------------------------------------


def library_rows(engine: Engine, model_id: int) -> list[tuple[int, str, str, str, dict[str, Any] | None, str | None]]:
    """The base model's library rows, oldest first: (id, key, kind, weights sha256, fused map, protected layer)."""
    q = (
        select(
            LibraryModelRecord.id,
            LibraryModelRecord.key,
            LibraryModelRecord.kind,
            Artifact.sha256,
            LibraryModelRecord.fused_map,
            LibraryModelRecord.protect_layer,
        )
        .join(Artifact, LibraryModelRecord.artifact_id == Artifact.id)
        .where(LibraryModelRecord.base_model_id == model_id)
        .order_by(LibraryModelRecord.id)
    )
    with Session(engine, expire_on_commit=False) as s:
        return [(i, key, kind, sha, fused, layer) for i, key, kind, sha, fused, layer in s.execute(q)]


def add_base_to_library(engine: Engine, model_id: int) -> None:
    """The base model's own library row (idempotent: a row another job added first is kept)."""
    with Session(engine, expire_on_commit=False) as s:
        bm = s.get(ModelRecord, model_id)
        assert bm is not None and bm.weights_artifact_id is not None
        s.add(LibraryModelRecord(base_model_id=bm.id, key="base", kind="base", artifact_id=bm.weights_artifact_id))
        try:
            s.commit()
        except IntegrityError:
            s.rollback()


def load_library(engine: Engine, loaded: LoadedBaseModel) -> tuple[list[pipeline.LibraryModel], dict[str, int]]:
    """The base model's library, every model's weights loaded (what screening needs), base
    first, then the robust base, then group models oldest first; and the row id of each (by key)."""
    rows = library_rows(engine, loaded.info.id)
    if not any(key == "base" for _, key, *_ in rows):  # its first use: the base joins its library
        add_base_to_library(engine, loaded.info.id)
        rows = library_rows(engine, loaded.info.id)
    order = {"base": 0, "robust": 1, "group": 2}
    rows.sort(key=lambda r: (order[r[2]], r[0]))
    lib, ids = [], {}
    for row_id, key, kind, sha, fused, layer in rows:
        model = loaded.model if kind == "base" else load_group_model(loaded, sha)
        fm = FaultMap.from_dict(fused, array=loaded.array) if fused else None
        lib.append(pipeline.LibraryModel(key, model, fm, (layer,) if layer else ()))
        ids[key] = row_id
    return lib, ids


def library_model(engine: Engine, loaded: LoadedBaseModel, key: str) -> nn.Module:
    """One library model of the base model, by key, its weights loaded alone (a retraining job
    needs only its group base): the base model itself for "base" or a key its library lacks."""
    if key == "base":
        return loaded.model
    with Session(engine, expire_on_commit=False) as s:
        sha = s.scalar(
            select(Artifact.sha256)
            .join(LibraryModelRecord, LibraryModelRecord.artifact_id == Artifact.id)
            .where(LibraryModelRecord.base_model_id == loaded.info.id, LibraryModelRecord.key == key)
        )
    return loaded.model if sha is None else load_group_model(loaded, sha)


def add_to_library(
    engine: Engine,
    model_id: int,
    key: str,
    kind: str,
    artifact_id: int,
    *,
    group_id: int | None = None,
    fused: FaultMap | None = None,
    protect_layer: str | None = None,
    training_epochs: int = 0,
) -> None:
    """A verified model into the library (idempotent: keyed by base model and key)."""
    with Session(engine, expire_on_commit=False) as s:
        exists = s.scalars(
            select(LibraryModelRecord.id).where(
                LibraryModelRecord.base_model_id == model_id, LibraryModelRecord.key == key
            )
        ).first()
        if exists is None:
            s.add(
                LibraryModelRecord(
                    base_model_id=model_id,
                    key=key,
                    kind=kind,
                    artifact_id=artifact_id,
                    group_id=group_id,
                    fused_map=fused.to_dict() if fused is not None else None,
                    protect_layer=protect_layer,
                    training_epochs=training_epochs,
                )
            )
            s.commit()


def library_artifacts(engine: Engine, model_id: int) -> dict[str, int]:
    """The weights artifact of each library model of a base model, by key: what a chip the
    model serves downloads (the weights it was verified with, unchanged; the chip bypasses
    its dead PEs, so their weights never reach the array)."""
    with Session(engine, expire_on_commit=False) as s:
        rows = s.execute(
            select(LibraryModelRecord.key, LibraryModelRecord.artifact_id).where(
                LibraryModelRecord.base_model_id == model_id
            )
        )
        return {str(k): int(a) for k, a in rows.tuples()}


def group_library_key(plan_id: int, group_key: str) -> str:
    return f"plan{plan_id}:{group_key}"


# --- plan documents, group models, chip assignments -----------------------------------------------


def stored_thresholds(summary: dict[str, Any]) -> pipeline.Thresholds:
    t = summary["thresholds"]
    return pipeline.Thresholds(
        float(t["baseline_validation"]), float(t["baseline_test"]), float(t["validation"]), float(t["test"])
    )


def find_group(doc: Plan, key: str) -> Group:
    for g in doc.groups:
        if g.group_id == key:
            return g
    raise ValueError(f"group {key!r} is not in its plan's document")


def store_group_model(
    engine: Engine,
    loaded: LoadedBaseModel,
    plan: PlanInfo,
    doc: Plan,
    g: Group,
    group_id: int,
    result: pipeline.GroupResult,
    resumed_from: int,
) -> None:
    """The group's model, its sparse delta against the base, and its manifest, as artifacts."""
    assert result.model is not None
    state = result.model.state_dict()
    model_bytes = state_dict_bytes(state, {"group": g.group_id})
    delta_bytes = sparse_delta(loaded.model.state_dict(), state)
    cfg = train_config(plan.params)
    thr = stored_thresholds(plan.summary)
    with Session(engine, expire_on_commit=False) as s:
        model_art = store_bytes(s, model_bytes, "group_model", SAFETENSORS)
        delta_art = store_bytes(s, delta_bytes, "group_delta", "application/gzip")
        manifest = plan_group_manifest(
            loaded.info,
            plan,
            doc,
            g,
            group_id,
            result,
            resumed_from,
            training=cfg.to_dict(),
            thresholds=thr,
            model=model_art,
            delta=delta_art,
        )
        man_art = store_bytes(s, manifest_bytes(manifest), "group_manifest", "application/json")
        row = s.get(GroupRecord, group_id)
        assert row is not None
        row.model_artifact_id, row.delta_artifact_id, row.manifest_artifact_id = model_art.id, delta_art.id, man_art.id
        row.protect_layer = result.protect[0] if result.protect else None
        row.status = "trained"
        s.commit()


def upsert_assignment(session: Session, chip_pk: int, model_id: int, **values: Any) -> None:
    """The chip's assignment for a base model, inserted or updated in one statement (INSERT ...
    ON CONFLICT), so two jobs assigning one chip at once cannot both insert."""
    dialect = session.get_bind().dialect.name
    insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
    values = {**values, "updated_at": utcnow()}
    stmt = insert(ChipAssignment).values(chip_pk=chip_pk, base_model_id=model_id, **values)
    session.execute(stmt.on_conflict_do_update(index_elements=["chip_pk", "base_model_id"], set_=values))
