"""Fleet retraining jobs: register a base model, build a plan, execute it, assign late chips.

Each handler is a job kind (see `workers.jobs`): ids in, JSON out, idempotent and
resumable. The planning and training logic lives in `planner` and `workers.pipeline`;
this module only loads rows, calls them, and stores what they return.

Transactions are short on purpose: read what a step needs, close the session, compute
(seconds to minutes), then write in a new session. On SQLite every transaction holds the
database's write lock, so a session left open across training would stall the API.

Fan-out: a resilience map is one child job per cell and a plan round is one child job
per group, published together as a Celery `group`. The parent job gathers them from the
jobs table and, while it waits, claims queued children and runs them itself, so a
single worker process can never deadlock on its own fan-out while many workers share it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from sqlalchemy import Engine, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session
from torch import nn

import accelerator as acc
from accelerator import ArrayConfig, FaultMap
from app.core.config import Settings, get_settings
from app.db.base import utcnow
from app.db.models import (
    AcceleratorProfile,
    Chip,
    ChipAssignment,
    GroupMember,
    GroupRecord,
    LibraryModelRecord,
    ModelRecord,
    PlanRecord,
    ResilienceMapRecord,
)
from app.services import jobs as jobsvc
from app.services.artifacts import open_artifact_file, read_artifact, store_bytes
from planner import AccuracyConstraint, CellTask, Group, Plan, ResilienceMap, SiteSeverity, measure_site_severity
from planner.economics import fap_t_epochs_at_least
from planner.plan import NEEDS_NOTHING, UNRECOVERABLE, VERIFIED
from workers import pipeline
from workers.export import group_manifest, manifest_bytes, sparse_delta, state_dict_bytes
from workers.jobs import JobContext, gather_children, handler

log = logging.getLogger("faultfleet.fleet")

SAFETENSORS = "application/octet-stream"  # safetensors has no registered media type


# --- loading a base model ------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """What a base model row says, read in one short transaction."""

    id: int
    name: str
    architecture: str
    dataset: str
    config: dict[str, Any]
    array: ArrayConfig
    weights_sha256: str | None
    baseline: float | None
    accelerator_id: int


@dataclass(frozen=True)
class Deployed:
    """A calibrated base model with its dataset (`accelerator.Dataset`), the array it runs
    on and the torch device this worker runs it on (`worker_device`; the model itself
    stays on the CPU, the accelerator functions take it there and back)."""

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
            dict(bm.config),
            profile_array(bm.accelerator),
            bm.weights.sha256 if bm.weights is not None else None,
            bm.baseline_accuracy,
            bm.accelerator_id,
        )


def load_state(sha256: str) -> dict[str, torch.Tensor]:
    """A state_dict stored as a safetensors artifact."""
    return safetensors_load(read_artifact(sha256))


def load_data(info: ModelInfo) -> Any:
    seed = int(info.config.get("seed", 0))
    sha = info.config.get("dataset_sha256")
    if sha:  # a user-uploaded .npz, kept as an artifact
        with open_artifact_file(sha, ".npz") as path:
            return acc.load_dataset(info.dataset, path, seed=seed)
    return acc.load_dataset(info.dataset, seed=seed)


# Loading a dataset and a model takes seconds and every job of a plan needs the same one:
# keep the last few per worker process, keyed by weights digest (never stale).
_DEPLOYED: dict[tuple[int, str], Deployed] = {}
_DEPLOYED_MAX = 4


def deployed(engine: Engine, model_id: int) -> Deployed:
    """The registered base model, ready to run (cached per process; the key includes its weights digest)."""
    info = model_info(engine, model_id)
    if info.weights_sha256 is None:
        raise ValueError(f"base model {model_id} is not ready")
    key = (model_id, info.weights_sha256)
    if key not in _DEPLOYED:
        data = load_data(info)
        model = acc.load_model(info.architecture, load_state(info.weights_sha256), data.input_shape, data.num_classes)
        while len(_DEPLOYED) >= _DEPLOYED_MAX:
            _DEPLOYED.pop(next(iter(_DEPLOYED)))
        _DEPLOYED[key] = Deployed(info, model, data, worker_device(get_settings()))
    return _DEPLOYED[key]


def worker_device(settings: Settings) -> str:
    """The torch device this worker runs models on: FAULTFLEET_DEVICE, 'auto' resolved
    to the GPU when torch sees one. A GPU asked for and missing fails the job by name."""
    if settings.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if settings.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"FAULTFLEET_DEVICE={settings.device}, but torch sees no CUDA device on this worker")
    return settings.device


def train_config(params: dict[str, Any], device: str | None = None) -> pipeline.TrainConfig:
    t = params.get("train", {})
    return pipeline.TrainConfig(
        lr=float(t.get("lr", 0.01)),
        batch_size=int(t.get("batch_size", 64)),
        seed=int(t.get("seed", 0)),
        device=device,
    )


def code_version() -> str:
    """The installed faultfleet's version: part of every cache key and manifest, so nothing
    an older emulator measured is served after an upgrade."""
    return f"faultfleet-{importlib.metadata.version('faultfleet')}"


def checkpoint_dir(settings: Settings, name: str) -> Path:
    """A job's checkpoint directory (under the artifact directory)."""
    path = Path(settings.artifact_dir or ".") / "checkpoints" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_group_model(dep: Deployed, sha256: str) -> nn.Module:
    return acc.load_model(dep.info.architecture, load_state(sha256), dep.data.input_shape, dep.data.num_classes)


# --- base model registration ---------------------------------------------------------------


def model_failed(params: dict[str, Any], error: str) -> Any:
    return update(ModelRecord).where(ModelRecord.id == int(params["model_id"])).values(status="failed", error=error)


def plan_failed(params: dict[str, Any], error: str) -> Any:
    return (
        update(PlanRecord)
        .where(PlanRecord.id == int(params["plan_id"]))
        .values(status="failed", error=error, updated_at=utcnow())
    )


@handler("register_model", on_failure=model_failed)
def register_model(ctx: JobContext) -> dict[str, Any]:
    """Train (or load) the base model, calibrate its activation scales, measure its baseline."""
    model_id = int(ctx.params["model_id"])
    info = model_info(ctx.engine, model_id)
    cfg, arch = info.config, info.architecture
    ctx.report(0.02, f"loading dataset {info.dataset}")
    data = load_data(info)
    device = worker_device(ctx.settings)
    uploaded = cfg.get("uploaded_weights_sha256")
    if uploaded:
        with open_artifact_file(uploaded, str(cfg.get("weights_suffix", ".safetensors"))) as path:
            model = acc.load_model(arch, path, data.input_shape, data.num_classes)
    else:
        model = acc.build_model(arch, data.input_shape, data.num_classes, seed=int(cfg.get("seed", 0)))
        epochs = int(cfg.get("epochs", 10))
        ctx.report(0.05, f"training {arch} on {data.name} for {epochs} epochs")

        def on_epoch(e: int, n: int, m: dict[str, float]) -> None:
            ctx.report(0.05 + 0.8 * e / n, f"training epoch {e}/{n}: loss {m.get('loss', float('nan')):.4f}")

        checkpoint = Path(ctx.settings.artifact_dir or ".") / "checkpoints" / f"model-{model_id}.pt"
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        model = acc.train(
            model,
            data,
            epochs,
            lr=float(cfg.get("lr", 0.05)),
            batch_size=int(cfg.get("batch_size", 64)),
            seed=int(cfg.get("seed", 0)),
            on_progress=on_epoch,
            checkpoint=checkpoint,
            device=device,
        )
    if acc.uncalibrated_layers(model):
        ctx.report(0.87, "calibrating activation scales on training data")
        acc.calibrate(model, data.x_train)
    ctx.report(0.9, "measuring baseline accuracy on the fault-free array")
    baseline = pipeline.baseline_accuracy(model, info.array, data, device=device)
    with Session(ctx.engine, expire_on_commit=False) as s:
        art = store_bytes(s, state_dict_bytes(model.state_dict(), {"architecture": arch}), "model", SAFETENSORS)
        bm = s.get(ModelRecord, model_id)
        assert bm is not None
        bm.weights_artifact_id, bm.baseline_accuracy, bm.status = art.id, baseline, "ready"
        s.commit()
        return {"model_id": model_id, "baseline_accuracy": baseline, "weights_sha256": art.sha256}


# --- planning: resilience map, severity, screening, grouping -------------------------------


@dataclass(frozen=True)
class PlanInfo:
    """What a plan row says, read in one short transaction."""

    id: int
    base_model_id: int
    accelerator_id: int
    params: dict[str, Any]
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
            dict(p.params),
            dict(p.constraint),
            dict(p.selection or {}),
            p.document,
            dict(p.summary or {}),
        )


def resilience_key(info: ModelInfo, spec: dict[str, Any], cfg: pipeline.TrainConfig) -> str:
    """Cache key of a resilience map: same weights, dataset, array and grid -> same map."""
    a = info.array
    body = {
        "weights": info.weights_sha256,
        "dataset": [info.dataset, info.config.get("dataset_sha256")],
        "array": [a.rows, a.cols, a.fmt, a.bypass],
        "grid": spec,
        "train": cfg.to_dict(),
        "split": "validation",
        "code": code_version(),
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@handler("resilience_cell")
def resilience_cell(ctx: JobContext) -> dict[str, Any]:
    """One cell task of a resilience map: retrain on one sampled map, accuracy after each amount."""
    task = CellTask.from_dict(ctx.params["task"])
    dep = deployed(ctx.engine, int(ctx.params["model_id"]))
    ctx.report(0.1, f"rate {task.rate:.4f} sample {task.sample}: retraining {task.training_epochs} epochs")
    em = dep.emulation(train_config(ctx.params, dep.device))
    accs = pipeline.measure_cell(dep.model, dep.array, em.validation, task, em.cfg)
    return {"task": task.to_dict(), "accuracies": [float(a) for a in accs]}


def ensure_resilience_map(
    ctx: JobContext, plan: PlanInfo, baseline: float, progress: tuple[float, float]
) -> tuple[int, ResilienceMap, bool]:
    """The cached map for the plan's model, dataset, array and grid (id, map, whether this
    call measured it); built by fanning out cells (on the validation split) if missing.
    `baseline`: the base model's fault-free validation accuracy."""
    grid = plan.params["resilience"]
    spec: dict[str, Any] = {
        "rates": sorted(float(r) for r in grid["rates"]),
        "epochs": sorted(int(e) for e in grid["epochs"]),
        "samples": int(grid["samples"]),
        "seed": int(grid.get("seed", 0)),
    }
    cfg = train_config(plan.params)
    info = model_info(ctx.engine, plan.base_model_id)
    key = resilience_key(info, spec, cfg)
    with Session(ctx.engine, expire_on_commit=False) as s:
        rec = s.scalars(select(ResilienceMapRecord).where(ResilienceMapRecord.key == key)).first()
        if rec is not None and rec.status == "ready" and rec.document is not None:
            return rec.id, ResilienceMap.from_dict(rec.document), False
        if rec is None:
            rec = ResilienceMapRecord(
                key=key, base_model_id=info.id, accelerator_id=plan.accelerator_id, status="building", params=spec
            )
            s.add(rec)
        rec.status, rec.error = "building", None  # a map that failed before is built again
        s.commit()
        rec_id = rec.id
    tasks = ResilienceMap.cell_tasks(spec["rates"], spec["epochs"], spec["samples"], spec["seed"])
    specs = [
        (
            f"rmap:{rec_id}:cell:{t.rate_index}:{t.sample}",
            "resilience_cell",
            {"model_id": info.id, "task": t.to_dict(), "train": cfg.to_dict()},
        )
        for t in tasks
    ]
    try:
        results = gather_children(ctx, specs, progress=progress, label="resilience map cells")
    except Exception as exc:  # never left 'building': failed, with the reason, and built again next time
        with Session(ctx.engine, expire_on_commit=False) as s:
            failed = s.get(ResilienceMapRecord, rec_id)
            assert failed is not None
            failed.status, failed.error = "failed", jobsvc.format_error(exc)
            s.commit()
        raise
    rmap = ResilienceMap.assemble(
        [(CellTask.from_dict(r["task"]), r["accuracies"]) for r in results.values()],
        baseline,
        meta={
            "model": info.name,
            "array": [info.array.rows, info.array.cols],
            "train": cfg.to_dict(),
            "seed": spec["seed"],
        },
    )
    with Session(ctx.engine, expire_on_commit=False) as s:
        rec = s.get(ResilienceMapRecord, rec_id)
        assert rec is not None
        rec.document, rec.status, rec.training_epochs = rmap.to_dict(), "ready", sum(t.training_epochs for t in tasks)
        s.commit()
    return rec_id, rmap, True


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
            epochs=g.amount,
            schedule=g.schedule["name"],
            predicted_cost=float(g.amount),
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


def plan_settings(params: dict[str, Any]) -> pipeline.FleetSettings:
    """A plan's `FleetSettings` from its stored params (`app.schemas.plans.PlanIn`'s fields)."""
    grid = params.get("resilience", {})
    ladder = tuple(sorted({0, *(int(e) for e in grid.get("epochs", (0, 1, 2, 4, 8)))}))
    return pipeline.FleetSettings(
        max_group_size=int(params.get("max_group_size", 5)),
        bypass=bool(params.get("bypass", True)),
        robust_base=str(params.get("robust_base", "auto")),
        resilience_map=str(params.get("resilience_map", "auto")),
        ladder=ladder if len(ladder) > 1 else (0, 1, 2, 4, 8),
        map_rates=tuple(sorted(float(r) for r in grid.get("rates", (0.01, 0.03, 0.06, 0.1)))),
        map_samples=int(grid.get("samples", 2)),
        schedule=str(params.get("schedule", "progressive_union")),
        seed=int(params.get("seed", 0)),
    )


def ensure_base_in_library(engine: Engine, dep: Deployed) -> None:
    """The base model's own library row (idempotent)."""
    with Session(engine, expire_on_commit=False) as s:
        exists = s.scalars(
            select(LibraryModelRecord.id).where(
                LibraryModelRecord.base_model_id == dep.info.id, LibraryModelRecord.key == "base"
            )
        ).first()
        if exists is None:
            bm = s.get(ModelRecord, dep.info.id)
            assert bm is not None and bm.weights_artifact_id is not None
            s.add(LibraryModelRecord(base_model_id=bm.id, key="base", kind="base", artifact_id=bm.weights_artifact_id))
            s.commit()


def load_library(engine: Engine, dep: Deployed) -> tuple[list[pipeline.LibraryModel], dict[str, int]]:
    """The base model's library, base first, then the robust base, then group models
    oldest first; and the row id of each (by key)."""
    ensure_base_in_library(engine, dep)
    with Session(engine, expire_on_commit=False) as s:
        rows = [
            (r.id, r.key, r.kind, r.artifact.sha256, r.fused_map, r.protect_layer)
            for r in s.scalars(
                select(LibraryModelRecord)
                .where(LibraryModelRecord.base_model_id == dep.info.id)
                .order_by(LibraryModelRecord.id)
            )
        ]
    order = {"base": 0, "robust": 1, "group": 2}
    rows.sort(key=lambda r: (order[r[2]], r[0]))
    lib, ids = [], {}
    for row_id, key, kind, sha, fused, layer in rows:
        model = dep.model if kind == "base" else load_group_model(dep, sha)
        fm = FaultMap.from_dict(fused, array=dep.array) if fused else None
        lib.append(pipeline.LibraryModel(key, model, fm, (layer,) if layer else ()))
        ids[key] = row_id
    return lib, ids


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


# --- planning: screening against the library, robust base, map or ladder, grouping ---------------


def robust_trainer(
    ctx: JobContext, dep: Deployed, em: pipeline.Emulation, settings: pipeline.FleetSettings, plan_id: int
) -> pipeline.RobustTrainer:
    """Train the robust base in this job, rung by rung (`pipeline.grow_robust_base`), each
    rung checkpointed every epoch through the artifact store's scratch directory of this
    plan, so a job taken over resumes at its last finished epoch."""
    total = settings.robust_ladder[-1]

    def train(model: nn.Module, maps: Sequence[FaultMap], start: int, epochs: int) -> nn.Module:
        ckpt = checkpoint_dir(ctx.settings, f"robust-plan{plan_id}") / f"robust-{start:04d}.pt"

        def on_epoch(e: int, _n: int, m: dict[str, float]) -> None:
            done = start + e
            ctx.report(0.3 + 0.2 * done / total, f"robust base: epoch {done}, loss {m.get('loss', float('nan')):.4f}")

        return pipeline.train_robust_base(
            em,
            model,
            maps,
            epochs=epochs,
            lr=settings.robust_lr,
            seed=settings.seed,
            start=start,
            checkpoint=ckpt,
            on_progress=on_epoch,
        )

    return train


@handler("plan", on_failure=plan_failed)
def build_plan(ctx: JobContext) -> dict[str, Any]:
    """`pipeline.plan_batch` over the plan's chips: screening against the base model's library,
    a robust base where it pays (stored in the library), a measured map (fanned out) where it
    pays or the ladder, then `plan_fleet`. What it cost goes into the plan's ledger."""
    plan = plan_info(ctx.engine, int(ctx.params["plan_id"]))
    if plan.document is not None:
        return {"plan_id": plan.id, "summary": plan.document.get("summary")}  # already built (idempotent)
    set_plan_status(ctx.engine, plan.id, "planning")
    dep = deployed(ctx.engine, plan.base_model_id)
    maps = selected_maps(ctx.engine, plan, dep.array)
    if not maps:
        raise ValueError("the plan selects no chips")
    settings = plan_settings(plan.params)
    em = dep.emulation(train_config(plan.params, dep.device))
    constraint = AccuracyConstraint.from_dict(plan.constraint)
    library, _ = load_library(ctx.engine, dep)
    rmap_id: int | None = None

    def build_map(model: nn.Module, thr: pipeline.Thresholds) -> tuple[ResilienceMap, SiteSeverity]:
        nonlocal rmap_id
        rmap_id, rmap, built = ensure_resilience_map(ctx, plan, thr.baseline_validation, progress=(0.5, 0.8))
        if built:
            em.ledger.train("resilience_map", rmap.training_epochs)
        severity = measure_site_severity(
            dep.array,
            lambda fm: em.validate(model, fm, kind="severity"),
            thr.baseline_validation,
            rate=rmap.rates[len(rmap.rates) // 2],
            samples=1,
            seed=settings.seed,
        )
        return rmap, severity

    n = len(maps)

    def progress(msg: str) -> None:
        ctx.report(0.05, msg)

    ctx.report(0.02, f"screening {n} chips against the model library")
    batch = pipeline.plan_batch(
        em,
        dep.model,
        maps,
        constraint,
        settings,
        library=library,
        train_robust=robust_trainer(ctx, dep, em, settings, plan.id),
        build_map=build_map,
        on_progress=progress,
    )
    if batch.decisions["robust_base"].get("trained") and any(lm.key == "robust" for lm in batch.library):
        robust = batch.model("robust").model
        with Session(ctx.engine, expire_on_commit=False) as s:
            art = store_bytes(
                s, state_dict_bytes(robust.state_dict(), {"robust_base": dep.info.name}), "model", SAFETENSORS
            )
            s.commit()
            art_id = art.id
        epochs = int(batch.decisions["robust_base"]["epochs"])
        add_to_library(ctx.engine, dep.info.id, "robust", "robust", art_id, training_epochs=epochs)
    doc = batch.plan
    with Session(ctx.engine, expire_on_commit=False) as s:
        row = s.get(PlanRecord, plan.id)
        assert row is not None
        row.resilience_map_id = rmap_id
        sync_groups(s, row, doc)
        row.summary = {
            **plan_summary(doc, em.ledger, batch.thresholds, batch.decisions),
            "group_base": batch.group_base,
        }
        row.status, row.error = "planned", None
        s.commit()
    return {"plan_id": plan.id, "summary": doc.summary()}


def plan_summary(
    doc: Plan, ledger: pipeline.Ledger, thr: pipeline.Thresholds, decisions: dict[str, Any]
) -> dict[str, Any]:
    """A plan's summary: the planner's counts, every cost so far and the FAP+T estimate beside it."""
    failing = sum(1 for st in doc.chips.values() if st.status != NEEDS_NOTHING)
    return {
        **doc.summary(),
        **ledger.to_dict(),
        "ledger": ledger.state(),
        "fap_t_epochs_at_least": fap_t_epochs_at_least(failing, doc.resilience_map.smallest_positive_amount),
        "thresholds": {
            "validation": thr.decision,
            "test": thr.verification,
            "baseline_validation": thr.baseline_validation,
            "baseline_test": thr.baseline_test,
        },
        "decisions": decisions,
        "threshold": thr.decision,
    }


def stored_thresholds(summary: dict[str, Any]) -> pipeline.Thresholds:
    t = summary["thresholds"]
    return pipeline.Thresholds(
        float(t["baseline_validation"]), float(t["baseline_test"]), float(t["validation"]), float(t["test"])
    )


# --- executing: one retraining job per group, verification, replans ------------------------


def member_bypass(doc: Plan, g: Group) -> dict[str, dict[str, Any]]:
    """Per member of `g`: the PEs it must bypass (beyond its dead ones) to compute what was
    verified, its bypass policy's and the group's (`planner.group_deployment`); members
    with none are left out."""
    out = {}
    for c in g.members:
        st = doc.chips[c]
        group_pes = g.fused.dead_pes - doc.maps[c].dead_pes
        pes = sorted({(int(r), int(col)) for r, col in st.bypassed} | group_pes)
        if st.bypass or pes:
            out[c] = {"policy": st.bypass, "pes": [list(pe) for pe in pes]}
    return out


def find_group(doc: Plan, key: str) -> Group:
    for g in doc.groups:
        if g.group_id == key:
            return g
    raise ValueError(f"group {key!r} is not in its plan's document")


@handler("retrain_group")
def retrain_group(ctx: JobContext) -> dict[str, Any]:
    """`pipeline.retrain_and_verify` for one group of a plan round: retrain from the group base
    (or the group it continues), checkpointed every epoch, verify every member on both
    splits, export the model, its sparse delta and a manifest. A re-run whose model is
    already stored only verifies again."""
    group_id = int(ctx.params["group_id"])
    with Session(ctx.engine, expire_on_commit=False) as s:
        row = s.get(GroupRecord, group_id)
        if row is None:
            raise ValueError(f"group {group_id} not found")
        key, plan_id = row.key, row.plan_id
        stored_sha = row.model.sha256 if row.model is not None else None
    plan = plan_info(ctx.engine, plan_id)
    doc = Plan.from_dict(plan.document or {})
    g = find_group(doc, key)
    dep = deployed(ctx.engine, plan.base_model_id)
    em = dep.emulation(train_config(plan.params, dep.device))
    library, _ = load_library(ctx.engine, dep)
    group_base_key = (plan.summary or {}).get("group_base", "base")
    group_base = next((lm.model for lm in library if lm.key == group_base_key), dep.model)
    start = group_base
    if g.warm_from:  # a replan that continues an earlier group's retrained model
        with Session(ctx.engine, expire_on_commit=False) as s:
            parent = s.scalars(
                select(GroupRecord).where(GroupRecord.plan_id == plan_id, GroupRecord.key == g.warm_from)
            ).first()
            sha = parent.model.sha256 if parent is not None and parent.model is not None else None
        if sha is None:
            raise ValueError(f"group {key} continues group {g.warm_from}, which has no trained model")
        start = load_group_model(dep, sha)
    ckdir = checkpoint_dir(ctx.settings, f"group-{group_id}")
    resumed_from = pipeline.checkpointed_epochs(ckdir)
    note = f", resuming after epoch {resumed_from}" if resumed_from else ""
    ctx.report(0.02, f"retraining {len(g.members)} chip(s) for {g.amount} epochs{note}")

    def on_epoch(done: int, total: int, metrics: dict[str, float]) -> None:
        ctx.report(
            0.05 + 0.8 * done / max(total, 1),
            f"epoch {done}/{total}: loss {metrics.get('loss', float('nan')):.4f}",
            checkpoint={"epochs_done": done, "resumed_from": resumed_from},
        )

    if stored_sha is not None:  # trained before this job was re-run: verify only
        ctx.report(0.85, "model already stored: verifying it again")
        trained = load_group_model(dep, stored_sha)
        result = pipeline.verify_members(em, trained, g, doc.maps, *pipeline.protection(em, g, group_base))
    else:
        result = pipeline.retrain_and_verify(
            em,
            start,
            g,
            doc.maps,
            doc.resilience_map.epochs,
            group_base=group_base,
            checkpoint_dir=ckdir,
            on_progress=on_epoch,
        )
    assert result.model is not None
    if stored_sha is None:
        store_group_model(ctx.engine, dep, plan, doc, g, group_id, result, resumed_from)
    shutil.rmtree(ckdir, ignore_errors=True)  # the model is stored; a re-run only verifies again
    return {**result.to_dict(), "ledger": em.ledger.state(), "resumed_from_epoch": resumed_from}


def store_group_model(
    engine: Engine,
    dep: Deployed,
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
    delta_bytes = sparse_delta(dep.model.state_dict(), state)
    cfg = train_config(plan.params)
    thr = stored_thresholds(plan.summary)
    with Session(engine, expire_on_commit=False) as s:
        model_art = store_bytes(s, model_bytes, "group_model", SAFETENSORS)
        delta_art = store_bytes(s, delta_bytes, "group_delta", "application/gzip")
        manifest = group_manifest(
            group={"id": group_id, "key": g.group_id, "plan_id": plan.id, "round": g.round, "reason": g.reason},
            fused_map_digest=g.fused.digest,
            fused_rate=g.fused.rate,
            schedule=g.schedule,
            epochs=g.amount,
            total_epochs=g.total_epochs,
            warm_from=g.warm_from,
            protect=list(result.protect),
            tmr_penalty=result.tmr_penalty,
            resumed_from_epoch=resumed_from,
            members=g.members,
            validation=result.validation,
            test=result.test,
            bypass=member_bypass(doc, g),
            training=cfg.to_dict(),
            base_model={
                "id": dep.info.id,
                "name": dep.info.name,
                "architecture": dep.info.architecture,
                "dataset": dep.info.dataset,
                "weights_sha256": dep.info.weights_sha256,
            },
            accelerator={
                "rows": dep.array.rows,
                "cols": dep.array.cols,
                "fmt": dep.array.fmt,
                "bypass": dep.array.bypass,
            },
            constraint=plan.constraint,
            thresholds={"validation": thr.decision, "test": thr.verification},
            model={"file": "model.safetensors", "sha256": model_art.sha256, "size": model_art.size},
            delta={"file": "model.delta.safetensors.gz", "sha256": delta_art.sha256, "size": delta_art.size},
            code_version=code_version(),
        )
        man_art = store_bytes(s, manifest_bytes(manifest), "group_manifest", "application/json")
        row = s.get(GroupRecord, group_id)
        assert row is not None
        row.model_artifact_id, row.delta_artifact_id, row.manifest_artifact_id = model_art.id, delta_art.id, man_art.id
        row.protect_layer = result.protect[0] if result.protect else None
        row.status = "trained"
        s.commit()


@handler("execute_plan", on_failure=plan_failed)
def execute_plan(ctx: JobContext) -> dict[str, Any]:
    """`pipeline.run_rounds` with every round's groups fanned out as child jobs; after each
    round the plan document (the checkpoint: a resumed job continues with the round it finds),
    the groups' rows and the ledger are stored, and group models that serve a verified member
    join the library. Then every chip is assigned the model it runs, verified on the test split."""
    plan_id = int(ctx.params["plan_id"])
    plan = plan_info(ctx.engine, plan_id)
    if plan.document is None:
        raise ValueError(f"plan {plan_id} is not built")
    doc = Plan.from_dict(plan.document)
    ledger = pipeline.Ledger.from_state((plan.summary or {})["ledger"])

    def fan_out(p: Plan, pending: list[Group]) -> dict[str, pipeline.GroupResult]:
        set_plan_status(ctx.engine, plan_id, "executing")
        with Session(ctx.engine, expire_on_commit=False) as s:
            ids = {g.key: g.id for g in s.scalars(select(GroupRecord).where(GroupRecord.plan_id == plan_id))}
        settled = sum(1 for st in p.chips.values() if st.status != "planned") / max(len(p.chips), 1)
        results = gather_children(
            ctx,
            [(f"group:{ids[g.group_id]}", "retrain_group", {"group_id": ids[g.group_id]}) for g in pending],
            progress=(0.9 * settled, 0.9 * settled + 0.9 * (1 - settled) * 0.8),
            label=f"round {p.round}: group retraining",
        )
        out = {}
        for g in pending:
            r = results[f"group:{ids[g.group_id]}"]
            ledger.add(pipeline.Ledger.from_state(r["ledger"]))
            out[g.group_id] = pipeline.GroupResult.from_dict(r)
        return out

    def store_round(p: Plan, results: dict[str, pipeline.GroupResult]) -> None:
        with Session(ctx.engine, expire_on_commit=False) as s:
            row = s.get(PlanRecord, plan_id)
            assert row is not None
            groups = {g.key: g for g in s.scalars(select(GroupRecord).where(GroupRecord.plan_id == plan_id))}
            for key in results:
                groups[key].status = "done"
            sync_groups(s, row, p)
            row.summary = {**(row.summary or {}), **p.summary(), **ledger.to_dict(), "ledger": ledger.state()}
            s.commit()
        for key, r in results.items():
            g = find_group(p, key)
            if any(p.chips[c].status == VERIFIED and p.chips[c].group_id == key for c in g.members):
                grp = groups[key]
                assert grp.model_artifact_id is not None
                add_to_library(
                    ctx.engine,
                    plan.base_model_id,
                    group_library_key(plan_id, key),
                    "group",
                    grp.model_artifact_id,
                    group_id=grp.id,
                    fused=g.fused,
                    protect_layer=r.protect[0] if r.protect else None,
                    training_epochs=g.amount,
                )

    doc = pipeline.run_rounds(doc, fan_out, on_round=store_round)
    ctx.report(0.92, "assigning every chip the model it runs, verified on the test split")
    dep = deployed(ctx.engine, plan.base_model_id)
    em = dep.emulation(train_config(plan.params, dep.device))
    assign_plan_chips(ctx.engine, em, plan, doc)
    ledger.add(em.ledger)
    with Session(ctx.engine, expire_on_commit=False) as s:
        row = s.get(PlanRecord, plan_id)
        assert row is not None
        thr = stored_thresholds(row.summary or {})
        tests = [st.test_accuracy for st in doc.chips.values()]
        summary = {
            **(row.summary or {}),
            **doc.summary(),
            **ledger.to_dict(),
            "ledger": ledger.state(),
            "retraining_epochs": doc.planned_epochs,
            "chips_meeting_constraint": sum(1 for a in tests if thr.met(a)),
        }
        row.status, row.error, row.summary, row.updated_at = "executed", None, summary, utcnow()
        row.document = doc.to_dict()
        s.commit()
    return {"plan_id": plan_id, "summary": summary}


def upsert_assignment(session: Session, chip_pk: int, model_id: int, **values: Any) -> None:
    """The chip's assignment for a base model, inserted or updated in one statement (INSERT ...
    ON CONFLICT), so two jobs assigning one chip at once cannot both insert."""
    dialect = session.get_bind().dialect.name
    insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
    values = {**values, "updated_at": utcnow()}
    stmt = insert(ChipAssignment).values(chip_pk=chip_pk, base_model_id=model_id, **values)
    session.execute(stmt.on_conflict_do_update(index_elements=["chip_pk", "base_model_id"], set_=values))


def assign_plan_chips(engine: Engine, em: pipeline.Emulation, plan: PlanInfo, doc: Plan) -> None:
    """Record, for every chip of the plan, the model it runs (idempotent upsert); chips that
    need no retraining are verified on the test split with their library model first."""
    dep = deployed(engine, plan.base_model_id)
    library, lib_ids = load_library(engine, dep)
    pipeline.verify_served(em, doc, library)
    weights = library_artifacts(engine, dep.info.id)
    with Session(engine, expire_on_commit=False) as s:
        groups = {
            g.key: (g.id, g.model_artifact_id)
            for g in s.scalars(select(GroupRecord).where(GroupRecord.plan_id == plan.id))
        }
        pks = dict(s.execute(select(Chip.chip_id, Chip.id).where(Chip.chip_id.in_(list(doc.chips)))).tuples().all())
        for cid, st in doc.chips.items():
            values: dict[str, Any] = {"plan_id": plan.id, "status": st.status, "reason": st.reason, "source": "plan"}
            values.update(
                bypass=st.bypass, group_id=None, artifact_id=None, accuracy=st.accuracy, library_model_id=None
            )
            values["test_accuracy"] = st.test_accuracy
            if st.status == VERIFIED and st.group_id in groups:
                values["group_id"], values["artifact_id"] = groups[st.group_id]
                values["library_model_id"] = None
            elif st.status == NEEDS_NOTHING:  # the very weights it was verified with
                values["artifact_id"] = weights[str(st.served_by)]
                values["library_model_id"] = lib_ids.get(str(st.served_by))
            elif st.status == UNRECOVERABLE:
                values["accuracy"] = st.best_accuracy
            upsert_assignment(s, pks[cid], plan.base_model_id, **values)
        s.commit()
    with Session(engine, expire_on_commit=False) as s:  # verified chips run their group's library model
        lib_rows = {
            r.group_id: r.id
            for r in s.scalars(select(LibraryModelRecord).where(LibraryModelRecord.base_model_id == plan.base_model_id))
            if r.group_id is not None
        }
        for a in s.scalars(select(ChipAssignment).where(ChipAssignment.plan_id == plan.id)):
            if a.status == VERIFIED and a.group_id in lib_rows:
                a.library_model_id = lib_rows[a.group_id]
        s.commit()


# --- chips that arrive after a plan ran: the library serves them -------------------------------


@handler("assign_chip")
def assign_chip(ctx: JobContext) -> dict[str, Any]:
    """Late chips screened against the library of every base model of their accelerator that
    has an executed plan (`pipeline.screen_fleet`: base, robust base, nearest group models,
    each on every deployment of the chip). A chip a model serves is assigned it at once,
    verified on the test split; the others wait (status `waiting`) for a plan over the chips
    no model serves. The result: per chip id, each base model's verdict."""
    pks = sorted({int(p) for p in ctx.params["chip_pks"]})  # a pending job gathers every late chip: maybe many
    with Session(ctx.engine, expire_on_commit=False) as s:
        chips = {
            c.id: (c.chip_id, dict(c.fault_map), c.accelerator_id)
            for start in range(0, len(pks), 10_000)  # IN lists under PostgreSQL's 65,535 bind parameters
            for c in s.scalars(select(Chip).where(Chip.id.in_(pks[start : start + 10_000])))
        }
        missing = sorted(set(pks) - set(chips))
        if missing:
            raise ValueError(f"chip(s) {missing[:10]} not found")
        accels = {a for _, _, a in chips.values()}
        latest: dict[int, tuple[int, dict[str, Any], dict[str, Any]]] = {}
        # the latest executed plan of each base model: its settings and thresholds, never its document
        for plan_id, model_id, params, summary in s.execute(
            select(PlanRecord.id, PlanRecord.base_model_id, PlanRecord.params, PlanRecord.summary)
            .join(ModelRecord)
            .where(ModelRecord.accelerator_id.in_(accels), PlanRecord.status == "executed")
            .order_by(PlanRecord.id.desc())
        ).tuples():
            latest.setdefault(model_id, (plan_id, dict(params or {}), dict(summary or {})))
    out: dict[str, dict[str, str]] = {cid: {} for cid, _, _ in chips.values()}
    for model_id, (plan_id, params, summary) in latest.items():
        dep = deployed(ctx.engine, model_id)
        em = dep.emulation(train_config(params, dep.device))
        thr = stored_thresholds(summary)
        library, lib_ids = load_library(ctx.engine, dep)
        mine = [
            (pk, cid, FaultMap.from_dict(fm, array=dep.array))
            for pk, (cid, fm, a) in chips.items()
            if a == dep.info.accelerator_id
        ]
        if not mine:
            continue
        ctx.report(0.1, f"screening {len(mine)} chip(s) against the library of base model {dep.info.name}")
        settings = plan_settings(params)
        screens = pipeline.screen_fleet(
            em,
            library,
            [fm for _, _, fm in mine],
            thr.decision,
            bypass=settings.bypass,
            group_base="robust" if "robust" in lib_ids else "base",
            max_groups=settings.library_groups,
        )
        by_key = {lm.key: lm for lm in library}
        weights = library_artifacts(ctx.engine, model_id)
        with Session(ctx.engine, expire_on_commit=False) as s:
            group_of = dict(
                s.execute(
                    select(LibraryModelRecord.key, LibraryModelRecord.group_id).where(
                        LibraryModelRecord.base_model_id == model_id
                    )
                )
                .tuples()
                .all()
            )
        assignments = {}
        for pk, cid, fm in mine:
            ctx.check()
            fit = screens[str(fm.chip_id)].fit
            values: dict[str, Any] = {"plan_id": plan_id, "source": "late", "group_id": None, "artifact_id": None}
            values.update(bypass=None, library_model_id=None, test_accuracy=None)
            if fit is None:
                values.update(
                    status="waiting",
                    accuracy=None,
                    reason="no library model meets the constraint on this chip; it waits for a plan",
                )
            else:
                lm = by_key[fit.key]
                deployed_map = acc.bypass_faulty_pes(fm, fit.policy) if fit.policy else fm
                test = em.verify(lm.model, lm.deployed(deployed_map), protect=lm.protect, kind="verification")
                values.update(
                    status="needs_nothing" if lm.fused is None else "verified",
                    accuracy=fit.accuracy,
                    test_accuracy=test,
                    reason=None,
                    bypass=fit.policy,
                    library_model_id=lib_ids[fit.key],
                    group_id=group_of.get(fit.key),
                    artifact_id=weights[fit.key],
                )
                log.info("late chip %s served by library model %s (bypass %s)", cid, fit.key, fit.policy)
            assignments[pk] = values
            out[cid][str(model_id)] = values["status"]
        with Session(ctx.engine, expire_on_commit=False) as s:
            for pk, values in assignments.items():
                upsert_assignment(s, pk, model_id, **values)
            s.commit()
        ledger_note = em.ledger.to_dict()
        log.info("late chips on base model %s cost %s", model_id, ledger_note)
    return {"assignments": out}
