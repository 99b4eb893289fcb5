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
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from celery import group as celery_group
from safetensors.torch import load as safetensors_load
from sqlalchemy import Engine, select
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
    Job,
    ModelRecord,
    PlanRecord,
    ResilienceMapRecord,
)
from app.services import jobs as jobsvc
from app.services.artifacts import open_artifact_file, read_artifact, store_bytes
from planner import AccuracyConstraint, CellTask, Group, Plan, ResilienceMap, group_deployment, plan_fleet, replan
from planner.severity import severity_from_measurements, severity_tasks
from workers import pipeline
from workers.celery_app import celery_app
from workers.export import manifest_bytes, sparse_delta, state_dict_bytes
from workers.jobs import JobAborted, JobContext, handler, run_job

log = logging.getLogger("faultfleet.fleet")

CODE_VERSION = "faultfleet-0.1.0"
SAFETENSORS = "application/octet-stream"  # safetensors has no registered media type
_WORKER = f"{socket.gethostname()}:{os.getpid()}"


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


def load_group_model(dep: Deployed, sha256: str) -> nn.Module:
    return acc.load_model(dep.info.architecture, load_state(sha256), dep.data.input_shape, dep.data.num_classes)


# --- fan-out of child jobs -----------------------------------------------------------------


def gather_children(
    ctx: JobContext,
    specs: Sequence[tuple[str, str, dict[str, Any]]],
    *,
    progress: tuple[float, float],
    label: str,
) -> dict[str, dict[str, Any]]:
    """Run child jobs (subject, kind, params) of `ctx`'s job to the end; subject -> result.

    Children that already exist (a resumed parent) are reused, not created again. Raises
    RuntimeError naming the first child that failed; cancels the children if the parent
    is cancelled.
    """
    with Session(ctx.engine, expire_on_commit=False) as s:
        existing = {j.subject: j.id for j in s.scalars(select(Job).where(Job.parent_id == ctx.job_id))}
        fresh = []
        for subject, kind, params in specs:
            if subject not in existing:
                job = jobsvc.create_job(s, kind, params, subject=subject, parent_id=ctx.job_id)
                existing[subject] = job.id
                fresh.append(job.id)
        s.commit()
    ids = {subject: existing[subject] for subject, _, _ in specs}
    if fresh:
        queue = ctx.settings.queue
        celery_group(celery_app.signature(jobsvc.TASK_NAME, args=[j], queue=queue) for j in fresh).apply_async()
    lo, hi = progress
    try:
        while True:
            with Session(ctx.engine, expire_on_commit=False) as s:
                rows = {
                    j.id: (j.state, j.error or j.message, j.result)
                    for j in s.scalars(select(Job).where(Job.id.in_(ids.values())))
                }
            failed = [(subj, rows[j]) for subj, j in ids.items() if rows[j][0] in ("failed", "cancelled")]
            if failed:
                subj, (state, error, _) = failed[0]
                raise RuntimeError(f"{label} {subj} {state}: {error}")
            done = sum(1 for j in ids.values() if rows[j][0] == "succeeded")
            ctx.report(lo + (hi - lo) * done / max(len(ids), 1), f"{label}: {done}/{len(ids)} done")
            if done == len(ids):
                return {subj: dict(rows[j][2] or {}) for subj, j in ids.items()}
            queued = [j for j in ids.values() if rows[j][0] == "queued"]
            if queued:
                run_job(queued[0], worker=f"{_WORKER}/inline")  # help instead of idling
            else:
                time.sleep(0.3)
    except JobAborted:
        for j in ids.values():
            jobsvc.cancel(ctx.engine, j)
        raise


# --- base model registration ---------------------------------------------------------------


@handler("register_model")
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
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@handler("resilience_cell")
def resilience_cell(ctx: JobContext) -> dict[str, Any]:
    """One cell task of a resilience map: retrain on one sampled map, accuracy after each amount."""
    task = CellTask.from_dict(ctx.params["task"])
    dep = deployed(ctx.engine, int(ctx.params["model_id"]))
    ctx.report(0.1, f"rate {task.rate:.4f} sample {task.sample}: retraining {task.training_epochs} epochs")
    accs = pipeline.measure_cell(dep.model, dep.array, dep.data, task, train_config(ctx.params, dep.device))
    return {"task": task.to_dict(), "accuracies": [float(a) for a in accs]}


def ensure_resilience_map(ctx: JobContext, plan: PlanInfo, progress: tuple[float, float]) -> tuple[int, ResilienceMap]:
    """The cached map for the plan's model, dataset, array and grid; built by fanning out cells if missing."""
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
            return rec.id, ResilienceMap.from_dict(rec.document)
        if rec is None:
            rec = ResilienceMapRecord(
                key=key, base_model_id=info.id, accelerator_id=plan.accelerator_id, status="building", params=spec
            )
            s.add(rec)
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
    results = gather_children(ctx, specs, progress=progress, label="resilience map cells")
    rmap = ResilienceMap.assemble(
        [(CellTask.from_dict(r["task"]), r["accuracies"]) for r in results.values()],
        float(info.baseline or 0.0),
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
    return rec_id, rmap


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
    plan.summary = doc.summary()
    plan.updated_at = utcnow()


def set_plan_status(engine: Engine, plan_id: int, status: str) -> None:
    with Session(engine, expire_on_commit=False) as s:
        p = s.get(PlanRecord, plan_id)
        assert p is not None
        p.status, p.updated_at = status, utcnow()
        s.commit()


@handler("plan")
def build_plan(ctx: JobContext) -> dict[str, Any]:
    """Resilience map (cached or fanned out), severity, screening of every chip, then `plan_fleet`."""
    plan = plan_info(ctx.engine, int(ctx.params["plan_id"]))
    if plan.document is not None:
        return {"plan_id": plan.id, "summary": plan.document.get("summary")}  # already built (idempotent)
    set_plan_status(ctx.engine, plan.id, "planning")
    rmap_id, rmap = ensure_resilience_map(ctx, plan, progress=(0.0, 0.6))
    dep = deployed(ctx.engine, plan.base_model_id)
    maps = selected_maps(ctx.engine, plan, dep.array)
    if not maps:
        raise ValueError("the plan selects no chips")
    sev = plan.params.get("severity", {})
    ctx.report(0.62, "measuring per-site fault severity of the base model")
    tasks = severity_tasks(
        dep.array,
        rate=float(sev.get("rate", rmap.rates[len(rmap.rates) // 2])),
        samples=int(sev.get("samples", 1)),
        seed=int(sev.get("seed", 0)),
    )
    severity = severity_from_measurements(
        [(t, acc.evaluate(dep.model, dep.array, t.fault_map, dep.data, device=dep.device)) for t in tasks],
        rmap.baseline,
    )
    constraint = AccuracyConstraint.from_dict(plan.constraint)
    screening: dict[str, float] = {}
    for i, m in enumerate(maps, start=1):
        screening[str(m.chip_id)] = float(acc.evaluate(dep.model, dep.array, m, dep.data, device=dep.device))
        if i % 10 == 0 or i == len(maps):
            ctx.report(0.65 + 0.2 * i / len(maps), f"screening chips on their own maps: {i}/{len(maps)}")
    bypass_screening: dict[str, dict[str, float]] = {}
    if plan.params.get("bypass", True) and dep.array.bypass:
        thr = constraint.threshold(rmap.baseline)
        failing = [m for m in maps if screening[str(m.chip_id)] < thr - 1e-12]
        for i, m in enumerate(failing, start=1):
            bypass_screening.update(pipeline.screen_bypassed(dep.model, dep.array, dep.data, [m], device=dep.device))
            if i % 10 == 0 or i == len(failing):
                ctx.report(
                    0.85 + 0.1 * i / len(failing), f"screening failing chips with PEs bypassed: {i}/{len(failing)}"
                )
    doc = plan_fleet(
        maps,
        screening,
        rmap,
        constraint,
        max_group_size=int(plan.params.get("max_group_size", 5)),
        severity=severity,
        seed=int(plan.params.get("seed", 0)),
        schedule=str(plan.params.get("schedule", "progressive_union")),
        bypass_screening=bypass_screening,
    )
    with Session(ctx.engine, expire_on_commit=False) as s:
        row = s.get(PlanRecord, plan.id)
        assert row is not None
        row.resilience_map_id = rmap_id
        sync_groups(s, row, doc)
        row.status = "planned"
        s.commit()
    return {"plan_id": plan.id, "summary": doc.summary()}


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


@handler("retrain_group")
def retrain_group(ctx: JobContext) -> dict[str, Any]:
    """Retrain the base model on a group's schedule (checkpoint per epoch), export it, verify every member."""
    group_id = int(ctx.params["group_id"])
    with Session(ctx.engine, expire_on_commit=False) as s:
        row = s.get(GroupRecord, group_id)
        if row is None:
            raise ValueError(f"group {group_id} not found")
        key, plan_id = row.key, row.plan_id
    plan = plan_info(ctx.engine, plan_id)
    doc = Plan.from_dict(plan.document or {})
    g = next(x for x in doc.groups if x.group_id == key)
    dep = deployed(ctx.engine, plan.base_model_id)
    cfg = train_config(plan.params, dep.device)
    protect: tuple[str, ...] = ()
    if g.protect:
        protect = (pipeline.most_sensitive_layer(dep.model, dep.array, g.fused, dep.data, device=dep.device),)
    start_model = dep.model
    if g.warm_from:  # a replan that continues an earlier group's retrained model
        with Session(ctx.engine, expire_on_commit=False) as s:
            parent = s.scalars(
                select(GroupRecord).where(GroupRecord.plan_id == plan_id, GroupRecord.key == g.warm_from)
            ).first()
            sha = parent.model.sha256 if parent is not None and parent.model is not None else None
        if sha is None:
            raise ValueError(f"group {key} continues group {g.warm_from}, which has no trained model")
        start_model = load_group_model(dep, sha)
    ckdir = Path(ctx.settings.artifact_dir or ".") / "checkpoints" / f"group-{group_id}"
    ckdir.mkdir(parents=True, exist_ok=True)
    resumed_from = pipeline.checkpointed_epochs(ckdir)
    note = f", resuming after epoch {resumed_from}" if resumed_from else ""
    ctx.report(0.02, f"retraining {len(g.members)} chip(s) for {g.amount} epochs{note}")

    def on_epoch(done: int, total: int, metrics: dict[str, float]) -> None:
        ctx.report(
            0.05 + 0.8 * done / max(total, 1),
            f"epoch {done}/{total}: loss {metrics.get('loss', float('nan')):.4f}",
            checkpoint={"epochs_done": done, "resumed_from": resumed_from},
        )

    retrained = pipeline.retrain_group(
        start_model,
        dep.array,
        dep.data,
        g,
        doc.maps,
        doc.resilience_map.epochs,
        cfg,
        protect=protect,
        checkpoint_dir=ckdir,
        on_progress=on_epoch,
    )
    ctx.report(0.88, "verifying every member chip on its own fault map, with the group's bypass")
    verification = pipeline.verify_group(
        retrained, dep.array, dep.data, g.members, doc.maps, protect=protect, fused=g.fused, device=dep.device
    )
    state = retrained.state_dict()
    model_bytes = state_dict_bytes(state, {"group": key})
    delta_bytes = sparse_delta(dep.model.state_dict(), state)
    with Session(ctx.engine, expire_on_commit=False) as s:
        model_art = store_bytes(s, model_bytes, "group_model", SAFETENSORS)
        delta_art = store_bytes(s, delta_bytes, "group_delta", "application/gzip")
        manifest = {
            "group": {"id": group_id, "key": key, "plan_id": plan_id, "round": g.round, "reason": g.reason},
            "members": list(g.members),
            "accuracy": {c: verification[c] for c in g.members},
            "bypass": member_bypass(doc, g),
            "fused_map_digest": g.fused.digest,
            "fused_rate": g.fused.rate,
            "schedule": g.schedule,
            "epochs": g.amount,
            "total_epochs": g.total_epochs,
            "warm_from": g.warm_from,
            "protect": list(protect),
            "baseline_accuracy": doc.resilience_map.baseline,
            "constraint": plan.constraint,
            "threshold": doc.threshold,
            "training": {**cfg.to_dict(), "optimizer": "SGD(momentum=0.9)"},
            "base_model": {
                "id": dep.info.id,
                "name": dep.info.name,
                "architecture": dep.info.architecture,
                "dataset": dep.info.dataset,
                "weights_sha256": dep.info.weights_sha256,
            },
            "accelerator": {
                "rows": dep.array.rows,
                "cols": dep.array.cols,
                "fmt": dep.array.fmt,
                "bypass": dep.array.bypass,
            },
            "model": {"file": "model.safetensors", "sha256": model_art.sha256, "size": model_art.size},
            "delta": {"file": "model.delta.safetensors.gz", "sha256": delta_art.sha256, "size": delta_art.size},
            "code_version": CODE_VERSION,
            "resumed_from_epoch": resumed_from,
        }
        man_art = store_bytes(s, manifest_bytes(manifest), "group_manifest", "application/json")
        row = s.get(GroupRecord, group_id)
        assert row is not None
        row.model_artifact_id, row.delta_artifact_id, row.manifest_artifact_id = model_art.id, delta_art.id, man_art.id
        row.protect_layer = protect[0] if protect else None
        row.status = "trained"
        s.commit()
    shutil.rmtree(ckdir, ignore_errors=True)  # the model is stored; a re-run would only redo verification
    return {"verification": verification, "model_sha256": model_art.sha256, "resumed_from_epoch": resumed_from}


@handler("execute_plan")
def execute_plan(ctx: JobContext) -> dict[str, Any]:
    """Rounds of: retrain every pending group (child jobs, in parallel), verify, `replan`; then assign chips.

    The plan document in the database is the checkpoint: a resumed job continues with the
    round it finds there and reuses the child jobs already created for it.
    """
    plan_id = int(ctx.params["plan_id"])
    while True:
        plan = plan_info(ctx.engine, plan_id)
        if plan.document is None:
            raise ValueError(f"plan {plan_id} is not built")
        doc = Plan.from_dict(plan.document)
        if doc.done:
            break
        set_plan_status(ctx.engine, plan_id, "executing")
        with Session(ctx.engine, expire_on_commit=False) as s:
            ids = {g.key: g.id for g in s.scalars(select(GroupRecord).where(GroupRecord.plan_id == plan_id))}
        pending = doc.pending_groups
        settled = sum(1 for st in doc.chips.values() if st.status != "planned") / max(len(doc.chips), 1)
        results = gather_children(
            ctx,
            [(f"group:{ids[g.group_id]}", "retrain_group", {"group_id": ids[g.group_id]}) for g in pending],
            progress=(0.9 * settled, 0.9 * settled + 0.9 * (1 - settled) * 0.8),
            label=f"round {doc.round}: group retraining",
        )
        verification = {c: float(a) for r in results.values() for c, a in r["verification"].items()}
        new_doc = replan(doc, verification)
        with Session(ctx.engine, expire_on_commit=False) as s:
            row = s.get(PlanRecord, plan_id)
            assert row is not None
            for g in pending:
                grp = s.get(GroupRecord, ids[g.group_id])
                assert grp is not None
                grp.status = "done"
            sync_groups(s, row, new_doc)
            s.commit()
    ctx.report(0.92, "assigning every chip the model it must run")
    assign_plan_chips(ctx.engine, plan, doc)
    summary = {
        **doc.summary(),
        "retraining_epochs": doc.planned_epochs,
        "threshold": doc.threshold,
        "epochs_ratio_vs_per_chip_fat": doc.per_chip_fat_epochs / doc.planned_epochs if doc.planned_epochs else None,
    }
    with Session(ctx.engine, expire_on_commit=False) as s:
        row = s.get(PlanRecord, plan_id)
        assert row is not None
        row.status, row.summary, row.updated_at = "executed", summary, utcnow()
        s.commit()
    return {"plan_id": plan_id, "summary": summary}


def base_model_for_chip(engine: Engine, dep: Deployed, fm: FaultMap, threshold: float) -> tuple[int, float]:
    """(artifact id, accuracy on the chip's own map) of the model for a chip that needs no retraining.

    Fault-aware pruning: weights mapped onto the chip's dead PEs are set to 0, so the file
    says what the chip computes. Pruning can shrink a channel's weight scale (its largest
    weight sat on a dead PE), so the pruned model is measured; should it miss the
    constraint, the unpruned base model (which passed screening) is shipped instead.
    """
    pruned = acc.prune_dead_pes(dep.model, dep.array, fm)
    model, accuracy = pruned, float(acc.evaluate(pruned, dep.array, fm, dep.data, device=dep.device))
    if accuracy < threshold - 1e-12:
        model, accuracy = dep.model, float(acc.evaluate(dep.model, dep.array, fm, dep.data, device=dep.device))
    meta = {"base_model": dep.info.name, "pruned": str(model is pruned)}
    with Session(engine, expire_on_commit=False) as s:
        return store_bytes(s, state_dict_bytes(model.state_dict(), meta), "chip_model", SAFETENSORS).id, accuracy


def upsert_assignment(session: Session, chip_pk: int, model_id: int, **values: Any) -> None:
    a = session.scalars(
        select(ChipAssignment).where(ChipAssignment.chip_pk == chip_pk, ChipAssignment.base_model_id == model_id)
    ).first()
    if a is None:
        a = ChipAssignment(chip_pk=chip_pk, base_model_id=model_id)
        session.add(a)
    for k, v in values.items():
        setattr(a, k, v)
    a.updated_at = utcnow()


def assign_plan_chips(engine: Engine, plan: PlanInfo, doc: Plan) -> None:
    """Record, for every chip of the plan, the model it must run (idempotent upsert)."""
    dep = deployed(engine, plan.base_model_id)
    pruned = {
        cid: base_model_for_chip(engine, dep, doc.maps[cid], doc.threshold)
        for cid, st in doc.chips.items()
        if st.status == "needs_nothing"
    }
    with Session(engine, expire_on_commit=False) as s:
        groups = {
            g.key: (g.id, g.model_artifact_id)
            for g in s.scalars(select(GroupRecord).where(GroupRecord.plan_id == plan.id))
        }
        pks = dict(s.execute(select(Chip.chip_id, Chip.id).where(Chip.chip_id.in_(list(doc.chips)))).tuples().all())
        for cid, st in doc.chips.items():
            values: dict[str, Any] = {"plan_id": plan.id, "status": st.status, "reason": st.reason, "source": "plan"}
            values["bypass"] = st.bypass
            values.update(group_id=None, artifact_id=None, accuracy=st.accuracy)
            if st.status == "verified" and st.group_id in groups:
                values["group_id"], values["artifact_id"] = groups[st.group_id]
            elif st.status == "needs_nothing":
                values["artifact_id"], values["accuracy"] = pruned[cid]
            elif st.status == "unrecoverable":
                values["accuracy"] = st.best_accuracy
            upsert_assignment(s, pks[cid], plan.base_model_id, **values)
        s.commit()


# --- a chip that arrives after a plan ran -------------------------------------------------


@handler("assign_chip")
def assign_chip(ctx: JobContext) -> dict[str, Any]:
    """Try late chips on the group models of the latest executed plan of each base model of their accelerator.

    Inference only: a chip whose base-model screening meets the plan's constraint needs
    nothing; otherwise the first group model that meets it on the chip's own map is
    assigned at once; if none does, the chip waits (status `waiting`) for the next plan.
    Where the plan allows bypass, each deployment (`pipeline.deployments`: own map, then each
    bypass policy) is tried, and the one taken is recorded with the assignment.
    """
    pks = [int(p) for p in ctx.params["chip_pks"]]
    out: dict[str, Any] = {}
    for n, chip_pk in enumerate(pks):
        ctx.report(n / len(pks), f"chip {n + 1}/{len(pks)}")
        out[str(chip_pk)] = assign_one_chip(ctx, chip_pk)
    return {"assignments": out}


def assign_one_chip(ctx: JobContext, chip_pk: int) -> dict[str, str]:
    with Session(ctx.engine, expire_on_commit=False) as s:
        chip = s.get(Chip, chip_pk)
        if chip is None:
            raise ValueError(f"chip {chip_pk} not found")
        fault_map, accel_id = dict(chip.fault_map), chip.accelerator_id
        plans = s.scalars(
            select(PlanRecord)
            .join(ModelRecord)
            .where(ModelRecord.accelerator_id == accel_id, PlanRecord.status == "executed")
            .order_by(PlanRecord.id.desc())
        ).all()
        latest: dict[int, tuple[int, dict[str, Any], bool]] = {}
        for p in plans:
            latest.setdefault(p.base_model_id, (p.id, p.document or {}, bool((p.params or {}).get("bypass", True))))
        trained = {
            plan_id: [
                (g.id, g.key, g.model_artifact_id, g.model.sha256, g.protect_layer, g.fused_map)
                for g in s.scalars(
                    select(GroupRecord)
                    .where(GroupRecord.plan_id == plan_id, GroupRecord.model_artifact_id.is_not(None))
                    .order_by(GroupRecord.index)
                )
                if g.model is not None
            ]
            for plan_id, _, _ in latest.values()
        }
    out: dict[str, str] = {}
    for model_id, (plan_id, document, bypass) in latest.items():
        dep = deployed(ctx.engine, model_id)
        fm = FaultMap.from_dict(fault_map, array=dep.array)
        thr = Plan.from_dict(document).threshold
        values: dict[str, Any] = {"plan_id": plan_id, "source": "late", "group_id": None, "artifact_id": None}
        values["bypass"] = None
        options = pipeline.deployments(fm, bypass)
        screening = {
            policy: float(acc.evaluate(dep.model, dep.array, m, dep.data, device=dep.device)) for policy, m in options
        }
        policy, best = max(screening.items(), key=lambda kv: kv[1])  # max keeps the first (mildest) of ties
        if best >= thr - 1e-12:
            art_id, accuracy = base_model_for_chip(ctx.engine, dep, dict(options)[policy], thr)
            values.update(status="needs_nothing", artifact_id=art_id, accuracy=accuracy, reason=None, bypass=policy)
        else:
            values.update(
                status="waiting",
                reason="no existing group model meets the constraint on this chip; it waits for the next plan",
            )
            for group_id, key, group_art, sha, layer, fused_json in trained[plan_id]:
                model = load_group_model(dep, sha)
                fused = FaultMap.from_dict(fused_json, array=dep.array)
                for policy, m in options:
                    ctx.check()
                    on_chip = group_deployment(m, fused)  # as the group's members run its model
                    accuracy = float(
                        acc.evaluate(
                            model, dep.array, on_chip, dep.data, protect=(layer,) if layer else (), device=dep.device
                        )
                    )
                    best = max(best, accuracy)
                    if accuracy >= thr - 1e-12:
                        values.update(
                            status="verified",
                            group_id=group_id,
                            artifact_id=group_art,
                            accuracy=accuracy,
                            reason=None,
                            bypass=policy,
                        )
                        log.info("late chip %s fits group %s of plan %s (bypass %s)", chip_pk, key, plan_id, policy)
                        break
                if values["status"] == "verified":
                    break
            if values["status"] == "waiting":
                values["accuracy"] = best
        with Session(ctx.engine, expire_on_commit=False) as s:
            upsert_assignment(s, chip_pk, model_id, **values)
            s.commit()
        out[str(model_id)] = values["status"]
    return out
