"""Fleet retraining jobs: register a base model, build a plan, execute it, assign late chips.

Each handler is a job kind (see `workers.jobs`): ids in, JSON out, idempotent and
resumable. The planning and training logic lives in `planner` and `workers.pipeline`;
this module only loads rows, calls them, and stores what they return.

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
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from celery import group as celery_group
from safetensors.torch import load as safetensors_load
from sqlalchemy import select
from sqlalchemy.orm import Session
from torch import nn

import accelerator as acc
from accelerator import ArrayConfig, FaultMap
from app.db.base import utcnow
from app.db.models import (
    AcceleratorProfile,
    Artifact,
    BaseModel,
    Chip,
    ChipAssignment,
    Group,
    GroupMember,
    Job,
    Plan,
    ResilienceMapRecord,
)
from app.services import jobs as jobsvc
from app.services.artifacts import open_artifact_file, read_artifact, store_bytes
from planner import AccuracyConstraint, CellTask, ResilienceMap, plan_fleet, replan
from planner import Plan as FleetPlan
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
class Deployed:
    """A calibrated base model with its dataset and the array it runs on."""

    model: nn.Module
    data: Any  # accelerator Dataset
    array: ArrayConfig
    weights_sha256: str


def load_state(sha256: str) -> dict[str, torch.Tensor]:
    """A state_dict stored as a safetensors artifact."""
    return safetensors_load(read_artifact(sha256))


def profile_array(p: AcceleratorProfile) -> ArrayConfig:
    return ArrayConfig(p.rows, p.cols, p.fmt, p.bypass)


def load_data(session: Session, bm: BaseModel) -> Any:
    sha = bm.config.get("dataset_sha256")
    if sha:  # a user-uploaded .npz, kept as an artifact
        with open_artifact_file(sha, ".npz") as path:
            return acc.load_dataset(bm.dataset, path, seed=int(bm.config.get("seed", 0)))
    return acc.load_dataset(bm.dataset, seed=int(bm.config.get("seed", 0)))


@lru_cache(maxsize=4)
def _deployed(model_id: int, weights_sha256: str, engine_key: str) -> Deployed:
    from app.db.session import get_engine

    with Session(get_engine()) as s:
        bm = s.get(BaseModel, model_id)
        assert bm is not None and bm.weights is not None
        data = load_data(s, bm)
        model = acc.load_model(bm.architecture, load_state(weights_sha256), data.input_shape, data.num_classes)
        return Deployed(model, data, profile_array(bm.accelerator), weights_sha256)


def deployed(session: Session, model_id: int) -> Deployed:
    """The registered base model `model_id`, ready to run (cached per process by weights digest)."""
    bm = session.get(BaseModel, model_id)
    if bm is None or bm.weights is None or bm.status != "ready":
        raise ValueError(f"base model {model_id} is not ready")
    return _deployed(model_id, bm.weights.sha256, str(session.get_bind().engine.url))


def train_config(params: dict[str, Any]) -> pipeline.TrainConfig:
    t = params.get("train", {})
    return pipeline.TrainConfig(
        lr=float(t.get("lr", 0.01)), batch_size=int(t.get("batch_size", 64)), seed=int(t.get("seed", 0))
    )


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
    from app.core.config import get_settings

    settings = get_settings()
    with Session(ctx.engine) as s:
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
        sig = jobsvc.TASK_NAME
        celery_group(celery_app.signature(sig, args=[jid], queue=settings.queue) for jid in fresh).apply_async()
    lo, hi = progress
    try:
        while True:
            with Session(ctx.engine) as s:
                rows = {j.id: j for j in s.scalars(select(Job).where(Job.id.in_(ids.values())))}
            failed = [(subj, rows[j]) for subj, j in ids.items() if rows[j].state in ("failed", "cancelled")]
            if failed:
                subj, job = failed[0]
                raise RuntimeError(f"{label} {subj} {job.state}: {job.error or job.message}")
            done = sum(1 for j in ids.values() if rows[j].state == "succeeded")
            ctx.report(lo + (hi - lo) * done / max(len(ids), 1), f"{label}: {done}/{len(ids)} done")
            if done == len(ids):
                return {subj: dict(rows[j].result or {}) for subj, j in ids.items()}
            queued = [j for j in ids.values() if rows[j].state == "queued"]
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
    with Session(ctx.engine) as s:
        bm = s.get(BaseModel, model_id)
        if bm is None:
            raise ValueError(f"base model {model_id} not found")
        cfg = dict(bm.config)
        arch, array = bm.architecture, profile_array(bm.accelerator)
        ctx.report(0.02, f"loading dataset {bm.dataset}")
        data = load_data(s, bm)
        uploaded = cfg.get("uploaded_weights_sha256")
        if uploaded:
            with open_artifact_file(uploaded, str(cfg.get("weights_suffix", ".safetensors"))) as path:
                model = acc.load_model(arch, path, data.input_shape, data.num_classes)
        else:
            model = acc.build_model(arch, data.input_shape, data.num_classes, seed=int(cfg.get("seed", 0)))
    if not uploaded:
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
        )
    if acc.uncalibrated_layers(model):
        ctx.report(0.87, "calibrating activation scales on training data")
        acc.calibrate(model, data.x_train[:2048])
    ctx.report(0.9, "measuring baseline accuracy on the fault-free array")
    baseline = pipeline.baseline_accuracy(model, array, data)
    with Session(ctx.engine) as s:
        art = store_bytes(s, state_dict_bytes(model.state_dict(), {"architecture": arch}), "model", SAFETENSORS)
        bm = s.get(BaseModel, model_id)
        assert bm is not None
        bm.weights_artifact_id, bm.baseline_accuracy, bm.status = art.id, baseline, "ready"
        s.commit()
        return {"model_id": model_id, "baseline_accuracy": baseline, "weights_sha256": art.sha256}


# --- planning: resilience map, severity, screening, grouping -------------------------------


def resilience_key(bm: BaseModel, array: ArrayConfig, spec: dict[str, Any], cfg: pipeline.TrainConfig) -> str:
    """Cache key of a resilience map: same weights, dataset, array and grid -> same map."""
    assert bm.weights is not None
    body = {
        "weights": bm.weights.sha256,
        "dataset": [bm.dataset, bm.config.get("dataset_sha256")],
        "array": [array.rows, array.cols, array.fmt, array.bypass],
        "grid": spec,
        "train": cfg.to_dict(),
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@handler("resilience_cell")
def resilience_cell(ctx: JobContext) -> dict[str, Any]:
    """One cell task of a resilience map: retrain on one sampled map, accuracy after each amount."""
    task = CellTask.from_dict(ctx.params["task"])
    with Session(ctx.engine) as s:
        dep = deployed(s, int(ctx.params["model_id"]))
    ctx.report(0.1, f"rate {task.rate:.4f} sample {task.sample}: retraining {task.training_epochs} epochs")
    accs = pipeline.measure_cell(dep.model, dep.array, dep.data, task, train_config(ctx.params))
    return {"task": task.to_dict(), "accuracies": [float(a) for a in accs]}


def ensure_resilience_map(ctx: JobContext, plan: Plan, progress: tuple[float, float]) -> ResilienceMapRecord:
    """The cached map for the plan's model, dataset, array and grid; built by fanning out cells if missing."""
    p = plan.params
    spec: dict[str, Any] = {
        "rates": sorted(float(r) for r in p["resilience"]["rates"]),
        "epochs": sorted(int(e) for e in p["resilience"]["epochs"]),
        "samples": int(p["resilience"]["samples"]),
        "seed": int(p["resilience"].get("seed", 0)),
    }
    cfg = train_config(p)
    with Session(ctx.engine) as s:
        bm = s.get(BaseModel, plan.base_model_id)
        assert bm is not None
        array = profile_array(bm.accelerator)
        key = resilience_key(bm, array, spec, cfg)
        rec = s.scalars(select(ResilienceMapRecord).where(ResilienceMapRecord.key == key)).first()
        if rec is not None and rec.status == "ready":
            return rec
        if rec is None:
            rec = ResilienceMapRecord(
                key=key, base_model_id=bm.id, accelerator_id=bm.accelerator_id, status="building", params=spec
            )
            s.add(rec)
            s.commit()
        rec_id, baseline, model_id = rec.id, float(bm.baseline_accuracy or 0.0), bm.id
    tasks = ResilienceMap.cell_tasks(spec["rates"], spec["epochs"], spec["samples"], spec["seed"])
    specs = [
        (
            f"rmap:{rec_id}:cell:{t.rate_index}:{t.sample}",
            "resilience_cell",
            {"model_id": model_id, "task": t.to_dict(), "train": cfg.to_dict()},
        )
        for t in tasks
    ]
    results = gather_children(ctx, specs, progress=progress, label="resilience map cells")
    rmap = ResilienceMap.assemble(
        [(CellTask.from_dict(r["task"]), r["accuracies"]) for r in results.values()],
        baseline,
        meta={"model_id": model_id, "array": [array.rows, array.cols], "train": cfg.to_dict(), "seed": spec["seed"]},
    )
    with Session(ctx.engine) as s:
        rec = s.get(ResilienceMapRecord, rec_id)
        assert rec is not None
        rec.document, rec.status, rec.training_epochs = rmap.to_dict(), "ready", rmap.training_epochs * spec["samples"]
        s.commit()
        return rec


def selected_chips(session: Session, plan: Plan) -> list[Chip]:
    """The chips a plan covers: its selection (lot, wafer, ids) among the model's accelerator's chips."""
    sel = plan.selection or {}
    q = select(Chip).where(Chip.accelerator_id == plan.base_model.accelerator_id)
    if sel.get("lot") is not None:
        q = q.where(Chip.lot == sel["lot"])
    if sel.get("wafer") is not None:
        q = q.where(Chip.wafer == sel["wafer"])
    if sel.get("ids"):
        q = q.where(Chip.chip_id.in_(sel["ids"]))
    return list(session.scalars(q.order_by(Chip.chip_id)))


def chip_fault_map(chip: Chip, array: ArrayConfig) -> FaultMap:
    return FaultMap.from_dict(chip.fault_map, array=array)


def sync_groups(session: Session, plan: Plan, doc: FleetPlan) -> None:
    """Mirror the planner's groups and chip states into rows (idempotent: keyed by group id)."""
    rows = {g.key: g for g in session.scalars(select(Group).where(Group.plan_id == plan.id))}
    chips = {c.chip_id: c for c in session.scalars(select(Chip).where(Chip.chip_id.in_(list(doc.chips))))}
    next_index = max((g.index for g in rows.values()), default=-1) + 1
    for g in doc.groups:
        row = rows.get(g.group_id)
        if row is None:
            row = Group(
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
            session.flush()
            rows[g.group_id] = row
    members = session.scalars(select(GroupMember).join(Group).where(Group.plan_id == plan.id)).all()
    by_pk = {c.id: c.chip_id for c in chips.values()}
    key_of = {r.id: k for k, r in rows.items()}
    for m in members:
        st = doc.chips[by_pk[m.chip_pk]]
        hist = next((h for h in st.history if h["group_id"] == key_of[m.group_id]), None)
        if hist is not None:
            m.accuracy = hist["accuracy"]
            m.status = "verified" if st.status == "verified" and st.group_id == key_of[m.group_id] else "missed"
            if st.status == "unrecoverable" and st.group_id == key_of[m.group_id]:
                m.status, m.reason = "unrecoverable", st.reason
    plan.document = doc.to_dict()
    plan.summary = doc.summary()
    plan.updated_at = utcnow()


@handler("plan")
def build_plan(ctx: JobContext) -> dict[str, Any]:
    """Resilience map (cached or fanned out), severity, screening of every chip, then `plan_fleet`."""
    plan_id = int(ctx.params["plan_id"])
    with Session(ctx.engine) as s:
        plan = s.get(Plan, plan_id)
        if plan is None:
            raise ValueError(f"plan {plan_id} not found")
        if plan.document is not None:
            return {"plan_id": plan_id, "summary": plan.summary}  # already built (idempotent)
        plan.status = "planning"
        s.commit()
    rec = ensure_resilience_map(ctx, plan, progress=(0.0, 0.6))
    with Session(ctx.engine) as s:
        plan = s.get(Plan, plan_id)
        assert plan is not None
        dep = deployed(s, plan.base_model_id)
        chips = selected_chips(s, plan)
        if not chips:
            raise ValueError("the plan selects no chips")
        maps = [chip_fault_map(c, dep.array) for c in chips]
        rmap = ResilienceMap.from_dict(rec.document or {})
        baseline = rmap.baseline
        p = plan.params
        sev_spec = p.get("severity", {})
        ctx.report(0.62, "measuring per-site fault severity of the base model")
        sev_tasks = severity_tasks(
            dep.array,
            rate=float(sev_spec.get("rate", max(rmap.rates[len(rmap.rates) // 2], 0.01))),
            samples=int(sev_spec.get("samples", 1)),
            seed=int(sev_spec.get("seed", 0)),
        )
        severity = severity_from_measurements(
            [(t, acc.evaluate(dep.model, dep.array, t.fault_map, dep.data)) for t in sev_tasks], baseline
        )
        screening: dict[str, float] = {}
        for i, m in enumerate(maps, start=1):
            screening[str(m.chip_id)] = float(acc.evaluate(dep.model, dep.array, m, dep.data))
            if i % 10 == 0 or i == len(maps):
                ctx.report(0.65 + 0.3 * i / len(maps), f"screening chips: {i}/{len(maps)}")
        doc = plan_fleet(
            maps,
            screening,
            rmap,
            AccuracyConstraint.from_dict(plan.constraint),
            max_group_size=int(p.get("max_group_size", 5)),
            severity=severity,
            seed=int(p.get("seed", 0)),
            schedule=str(p.get("schedule", "progressive_union")),
        )
        plan.resilience_map_id = rec.id
        sync_groups(s, plan, doc)
        plan.status = "planned"
        s.commit()
        return {"plan_id": plan_id, "summary": doc.summary()}


# --- executing: one retraining job per group, verification, replans ------------------------


def checkpoint_dir(ctx: JobContext, group_id: int) -> Path:
    d = Path(ctx.settings.artifact_dir or ".") / "checkpoints" / f"group-{group_id}"
    d.mkdir(parents=True, exist_ok=True)
    return d


@handler("retrain_group")
def retrain_group(ctx: JobContext) -> dict[str, Any]:
    """Retrain the base model on a group's schedule (checkpoint per epoch), export it, verify every member."""
    group_id = int(ctx.params["group_id"])
    with Session(ctx.engine) as s:
        row = s.get(Group, group_id)
        if row is None:
            raise ValueError(f"group {group_id} not found")
        plan = row.plan
        doc = FleetPlan.from_dict(plan.document or {})
        g = next(x for x in doc.groups if x.group_id == row.key)
        dep = deployed(s, plan.base_model_id)
        bm = plan.base_model
        cfg = train_config(plan.params)
        constraint = plan.constraint
    protect: tuple[str, ...] = ()
    if g.protect:
        protect = (pipeline.most_sensitive_layer(dep.model, dep.array, g.fused, dep.data),)
    ckdir = checkpoint_dir(ctx, group_id)
    resumed_from = pipeline.checkpointed_epochs(ckdir)
    ctx.report(
        0.02,
        f"retraining {len(g.members)} chip(s) for {g.amount} epochs"
        + (f", resuming at epoch {resumed_from}" if resumed_from else ""),
    )

    def on_epoch(done: int, total: int, metrics: dict[str, float]) -> None:
        ctx.report(
            0.05 + 0.8 * done / max(total, 1),
            f"epoch {done}/{total}: loss {metrics.get('loss', float('nan')):.4f}",
            checkpoint={"epochs_done": done, "resumed_from": resumed_from},
        )

    retrained = pipeline.retrain_group(
        dep.model,
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
    ctx.report(0.88, "verifying every member chip on its own fault map")
    verification = pipeline.verify_group(retrained, dep.array, dep.data, g.members, doc.maps, protect=protect)
    state = retrained.state_dict()
    with Session(ctx.engine) as s:
        model_art = store_bytes(s, state_dict_bytes(state, {"group": row.key}), "group_model", SAFETENSORS)
        delta_art = store_bytes(s, sparse_delta(dep.model.state_dict(), state), "group_delta", "application/gzip")
        manifest = {
            "group": {"id": group_id, "key": g.group_id, "plan_id": plan.id, "round": g.round, "reason": g.reason},
            "members": list(g.members),
            "accuracy": {c: verification[c] for c in g.members},
            "fused_map_digest": g.fused.digest,
            "fused_rate": g.fused.rate,
            "schedule": g.schedule,
            "epochs": g.amount,
            "protect": list(protect),
            "baseline_accuracy": doc.resilience_map.baseline,
            "constraint": constraint,
            "threshold": doc.threshold,
            "training": {**cfg.to_dict(), "optimizer": "SGD(momentum=0.9)"},
            "base_model": {
                "id": bm.id,
                "name": bm.name,
                "architecture": bm.architecture,
                "dataset": bm.dataset,
                "weights_sha256": dep.weights_sha256,
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
        row = s.get(Group, group_id)
        assert row is not None
        row.model_artifact_id, row.delta_artifact_id, row.manifest_artifact_id = model_art.id, delta_art.id, man_art.id
        row.protect_layer = protect[0] if protect else None
        row.status = "trained"
        s.commit()
    return {"verification": verification, "model_sha256": model_art.sha256, "resumed_from_epoch": resumed_from}


@handler("execute_plan")
def execute_plan(ctx: JobContext) -> dict[str, Any]:
    """Rounds of: retrain every pending group (child jobs, in parallel), verify, `replan`; then assign chips."""
    plan_id = int(ctx.params["plan_id"])
    epochs_trained = 0
    while True:
        with Session(ctx.engine) as s:
            plan = s.get(Plan, plan_id)
            if plan is None or plan.document is None:
                raise ValueError(f"plan {plan_id} is not built")
            doc = FleetPlan.from_dict(plan.document)
            if doc.done:
                break
            plan.status = "executing"
            keys = {g.key: g.id for g in s.scalars(select(Group).where(Group.plan_id == plan_id))}
            s.commit()
        pending = doc.pending_groups
        settled = sum(1 for st in doc.chips.values() if st.status != "planned")
        lo = settled / max(len(doc.chips), 1)
        results = gather_children(
            ctx,
            [(f"group:{keys[g.group_id]}", "retrain_group", {"group_id": keys[g.group_id]}) for g in pending],
            progress=(0.95 * lo, 0.95 * lo + 0.95 * (1 - lo) * 0.9),
            label=f"round {doc.round}: group retraining",
        )
        verification = {c: float(a) for r in results.values() for c, a in r["verification"].items()}
        epochs_trained += sum(g.amount for g in pending)
        new_doc = replan(doc, verification)
        with Session(ctx.engine) as s:
            plan = s.get(Plan, plan_id)
            assert plan is not None
            for g in pending:
                row = s.get(Group, keys[g.group_id])
                assert row is not None
                row.status = "done"
            sync_groups(s, plan, new_doc)
            s.commit()
    with Session(ctx.engine) as s:
        plan = s.get(Plan, plan_id)
        assert plan is not None
        assign_plan_chips(s, plan, doc)
        plan.status = "executed"
        summary = dict(doc.summary())
        summary["retraining_epochs"] = doc.planned_epochs
        summary["threshold"] = doc.threshold
        summary["epochs_ratio_vs_per_chip_fat"] = (
            doc.per_chip_fat_epochs / doc.planned_epochs if doc.planned_epochs else None
        )
        plan.summary = summary
        s.commit()
    ctx.report(1.0, "every chip verified or declared unrecoverable")
    return {"plan_id": plan_id, "summary": summary}


def base_model_for_chip(
    session: Session, dep: Deployed, bm: BaseModel, fm: FaultMap, threshold: float
) -> tuple[Artifact, float]:
    """The model for a chip that needs no retraining, and its accuracy on the chip's own map.

    Fault-aware pruning: weights mapped onto the chip's dead PEs are set to 0, so the file
    says what the chip computes. Pruning can shrink a channel's weight scale (its largest
    weight sat on a dead PE), so the pruned model is measured; should it miss the
    constraint, the unpruned base model (which passed screening) is shipped instead.
    """
    candidates = [acc.prune_dead_pes(dep.model, dep.array, fm), dep.model]
    for model in candidates:
        accuracy = float(acc.evaluate(model, dep.array, fm, dep.data))
        if accuracy >= threshold - 1e-12 or model is dep.model:
            meta = {"base_model": bm.name, "pruned": str(model is not dep.model)}
            art = store_bytes(session, state_dict_bytes(model.state_dict(), meta), "chip_model", SAFETENSORS)
            return art, accuracy
    raise AssertionError("unreachable")


def assign_plan_chips(session: Session, plan: Plan, doc: FleetPlan) -> None:
    """Record, for every chip of the plan, the model it must run (idempotent upsert)."""
    dep = deployed(session, plan.base_model_id)
    groups = {g.key: g for g in session.scalars(select(Group).where(Group.plan_id == plan.id))}
    chips = {c.chip_id: c for c in session.scalars(select(Chip).where(Chip.chip_id.in_(list(doc.chips))))}
    for cid, st in doc.chips.items():
        chip = chips[cid]
        a = session.scalars(
            select(ChipAssignment).where(
                ChipAssignment.chip_pk == chip.id, ChipAssignment.base_model_id == plan.base_model_id
            )
        ).first()
        if a is None:
            a = ChipAssignment(chip_pk=chip.id, base_model_id=plan.base_model_id)
            session.add(a)
        a.plan_id, a.status, a.reason, a.source = plan.id, st.status, st.reason, "plan"
        a.accuracy = st.accuracy if st.status != "unrecoverable" else st.best_accuracy
        a.group_id, a.artifact_id = None, None
        if st.status == "verified" and st.group_id in groups:
            a.group_id = groups[st.group_id].id
            a.artifact_id = groups[st.group_id].model_artifact_id
        elif st.status == "needs_nothing":
            art, a.accuracy = base_model_for_chip(session, dep, plan.base_model, doc.maps[cid], doc.threshold)
            a.artifact_id = art.id
        a.updated_at = utcnow()
    session.flush()


# --- a chip that arrives after a plan ran -------------------------------------------------


@handler("assign_chip")
def assign_chip(ctx: JobContext) -> dict[str, Any]:
    """Try a late chip on every executed plan's group models of its accelerator (inference only).

    The first model that meets the plan's constraint on the chip's own map is assigned at
    once; if none does, the chip waits (status `waiting`) for the next plan.
    """
    out: dict[str, Any] = {}
    for n, chip_pk in enumerate(ctx.params["chip_pks"]):
        ctx.report(n / len(ctx.params["chip_pks"]), f"chip {n + 1}/{len(ctx.params['chip_pks'])}")
        out[str(chip_pk)] = assign_one_chip(ctx, int(chip_pk))
    return {"assignments": out}


def assign_one_chip(ctx: JobContext, chip_pk: int) -> dict[str, str]:
    """Per base model with an executed plan: needs_nothing, verified (on a group model) or waiting."""
    out: dict[str, str] = {}
    with Session(ctx.engine) as s:
        chip = s.get(Chip, chip_pk)
        if chip is None:
            raise ValueError(f"chip {chip_pk} not found")
        plans = s.scalars(
            select(Plan)
            .join(BaseModel)
            .where(BaseModel.accelerator_id == chip.accelerator_id, Plan.status == "executed")
            .order_by(Plan.id.desc())
        ).all()
        latest: dict[int, Plan] = {}
        for p in plans:
            latest.setdefault(p.base_model_id, p)
        for model_id, plan in latest.items():
            existing = s.scalars(
                select(ChipAssignment).where(
                    ChipAssignment.chip_pk == chip_pk, ChipAssignment.base_model_id == model_id
                )
            ).first()
            if (
                existing is not None
                and existing.status in ("verified", "needs_nothing")
                and existing.plan_id == plan.id
            ):
                out[str(model_id)] = existing.status
                continue
            dep = deployed(s, model_id)
            fm = chip_fault_map(chip, dep.array)
            doc = FleetPlan.from_dict(plan.document or {})
            thr = doc.threshold
            a = existing or ChipAssignment(chip_pk=chip_pk, base_model_id=model_id)
            s.add(a)
            a.plan_id, a.source, a.group_id, a.artifact_id, a.reason = plan.id, "late", None, None, None
            screening = float(acc.evaluate(dep.model, dep.array, fm, dep.data))
            best = screening
            if screening >= thr:
                art, a.accuracy = base_model_for_chip(s, dep, plan.base_model, fm, thr)
                a.status, a.artifact_id = "needs_nothing", art.id
            else:
                a.status, a.accuracy = "waiting", screening
                a.reason = "no existing group model meets the constraint on this chip; it waits for the next plan"
                trained = s.scalars(
                    select(Group)
                    .where(Group.plan_id == plan.id, Group.model_artifact_id.is_not(None))
                    .order_by(Group.index)
                ).all()
                for grp in trained:
                    ctx.check()
                    assert grp.model is not None
                    model = acc.load_model(
                        plan.base_model.architecture,
                        load_state(grp.model.sha256),
                        dep.data.input_shape,
                        dep.data.num_classes,
                    )
                    protect = (grp.protect_layer,) if grp.protect_layer else ()
                    accuracy = float(acc.evaluate(model, dep.array, fm, dep.data, protect=protect))
                    best = max(best, accuracy)
                    if accuracy >= thr:
                        a.status, a.accuracy, a.reason = "verified", accuracy, None
                        a.group_id, a.artifact_id = grp.id, grp.model_artifact_id
                        break
                if a.status == "waiting":
                    a.accuracy = best
            a.updated_at = utcnow()
            out[str(model_id)] = a.status
        s.commit()
    return out
