"""Resilience maps, cached by `resilience_key`: the full grid (one child job per cell,
assembled here) or an adaptive map (`workers.adaptive_map`: the cells one fleet's retraining
epochs depend on), built in the plan's job in one process, each sampled map's run checkpointed
every epoch. Its climb decides which sampled map to train next from every measurement so
far, one at a time, so it does not fan out as cells do."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import (
    ResilienceMapRecord,
)
from app.schemas.plans import TrainIn
from app.services import jobs as jobsvc
from planner import CellTask, ResilienceMap, SiteSeverity
from workers import pipeline
from workers.checkpoints import JobCheckpoints
from workers.export import code_version, state_dict_bytes
from workers.jobs import JobContext, gather_children, handler
from workers.store import ModelInfo, PlanInfo, load_base_model, model_info, train_config


def resilience_key(info: ModelInfo, spec: dict[str, Any], cfg: pipeline.TrainConfig) -> str:
    """Cache key of a resilience map: same weights, dataset, array and grid -> same map."""
    a = info.array
    body = {
        "weights": info.weights_sha256,
        "dataset": [info.dataset, info.config.dataset_sha256],
        "array": [a.rows, a.cols, a.fmt, a.bypass],
        "grid": spec,
        "train": cfg.to_dict(),
        "split": "validation",
        "code": code_version(),
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@handler("resilience_cell")
def resilience_cell(ctx: JobContext) -> dict[str, Any]:
    """One cell task of a resilience map: retrain on one sampled map, accuracy after each count of epochs."""
    task = CellTask.from_dict(ctx.params["task"])
    loaded = load_base_model(ctx.engine, int(ctx.params["model_id"]))
    ctx.report(0.1, f"rate {task.rate:.4f} sample {task.sample}: retraining {task.training_epochs} epochs")
    em = loaded.emulation(train_config(TrainIn.model_validate(ctx.params["train"], strict=False), loaded.device))
    accs = pipeline.measure_cell(loaded.model, loaded.array, em.validation, task, em.cfg)
    return {"task": task.to_dict(), "accuracies": [float(a) for a in accs]}


def _grid_spec(plan: PlanInfo) -> dict[str, Any]:
    grid = plan.params.resilience
    return {"rates": sorted(grid.rates), "epochs": sorted(grid.epochs), "samples": grid.samples, "seed": grid.seed}


def _ready_map(ctx: JobContext, key: str) -> tuple[int, ResilienceMap] | None:
    with Session(ctx.engine, expire_on_commit=False) as s:
        rec = s.scalars(select(ResilienceMapRecord).where(ResilienceMapRecord.key == key)).first()
        if rec is not None and rec.status == "ready" and rec.document is not None:
            return rec.id, ResilienceMap.from_dict(rec.document)
    return None


def _start_building(ctx: JobContext, plan: PlanInfo, info: ModelInfo, key: str, params: dict[str, Any]) -> int:
    """The id of map record `key`, marked building (created if missing; a failed one is built again)."""
    with Session(ctx.engine, expire_on_commit=False) as s:
        rec = s.scalars(select(ResilienceMapRecord).where(ResilienceMapRecord.key == key)).first()
        if rec is None:
            rec = ResilienceMapRecord(
                key=key, base_model_id=info.id, accelerator_id=plan.accelerator_id, status="building", params=params
            )
            s.add(rec)
        rec.status, rec.error = "building", None
        s.commit()
        return rec.id


def _mark_failed(ctx: JobContext, rec_id: int, exc: BaseException) -> None:
    """Never left 'building': failed, with the reason, and built again next time."""
    with Session(ctx.engine, expire_on_commit=False) as s:
        failed = s.get(ResilienceMapRecord, rec_id)
        assert failed is not None
        failed.status, failed.error = "failed", jobsvc.format_error(exc)
        s.commit()


def _store_ready(ctx: JobContext, rec_id: int, rmap: ResilienceMap, training_epochs: int) -> None:
    with Session(ctx.engine, expire_on_commit=False) as s:
        rec = s.get(ResilienceMapRecord, rec_id)
        assert rec is not None
        rec.document, rec.status, rec.training_epochs = rmap.to_dict(), "ready", training_epochs
        s.commit()


def ensure_resilience_map(
    ctx: JobContext, plan: PlanInfo, baseline: float, progress: tuple[float, float]
) -> tuple[int, ResilienceMap, bool]:
    """The cached full-grid map for the plan's model, dataset, array and grid (id, map,
    whether this call measured it); built by fanning out cells (on the validation split) if
    missing. `baseline`: the base model's fault-free validation accuracy."""
    spec = _grid_spec(plan)
    cfg = train_config(plan.params)
    info = model_info(ctx.engine, plan.base_model_id)
    key = resilience_key(info, spec, cfg)
    if (ready := _ready_map(ctx, key)) is not None:
        return ready[0], ready[1], False
    rec_id = _start_building(ctx, plan, info, key, spec)
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
    except Exception as exc:
        _mark_failed(ctx, rec_id, exc)
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
    _store_ready(ctx, rec_id, rmap, sum(t.training_epochs for t in tasks))
    return rec_id, rmap, True


def _fleet_digest(
    model: Any, fleet: pipeline.MapFleet, severity: SiteSeverity, settings: pipeline.FleetSettings
) -> str:
    """sha256 of what an adaptive map depends on besides the grid: the model it climbs from
    (the base or the robust base), the chips it places and how, and its tail share."""
    body = {
        "model": hashlib.sha256(state_dict_bytes(model.state_dict())).hexdigest(),
        "constraint": fleet.constraint.to_dict(),
        "chips": sorted((str(m.chip_id), m.to_dict()) for m in fleet.chips),
        "screening": dict(sorted(fleet.screening.items())),
        "bypass_screening": fleet.bypass_screening,
        "served_by": dict(sorted(fleet.served_by.items())),
        "placement": fleet.placement,
        "severity": severity.to_dict(),
        "max_undecided": settings.map_max_undecided,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def ensure_adaptive_map(
    ctx: JobContext,
    plan: PlanInfo,
    em: pipeline.Emulation,
    model: Any,
    thr: pipeline.Thresholds,
    settings: pipeline.FleetSettings,
    fleet: pipeline.MapFleet,
    severity: SiteSeverity,
    progress: tuple[float, float],
) -> tuple[int, ResilienceMap, bool]:
    """The adaptive map of `model` for `fleet` (id, map, whether this call measured it).

    A ready full-grid map of the same grid serves instead (it gives every chip's epochs, and costs
    nothing now). Otherwise the adaptive map cached for the same model, chips and inputs, or
    built here (`pipeline.measure_adaptive_map`, charged to `em.ledger`), each sampled map's
    run checkpointed every epoch through the artifact store, so a job taken over resumes at
    the last finished epoch. Its record's `params` say `"cells": "adaptive"`, its
    `training_epochs` are the cell epochs trained, and its map has NaN (JSON null) cells."""
    spec = _grid_spec(plan)
    info = model_info(ctx.engine, plan.base_model_id)
    full = _ready_map(ctx, resilience_key(info, spec, em.cfg))
    if full is not None:
        return full[0], full[1], False
    params = {**spec, "cells": "adaptive", "chips": len(fleet.chips), "max_undecided": settings.map_max_undecided}
    key = resilience_key(info, {**params, "fleet": _fleet_digest(model, fleet, severity, settings)}, em.cfg)
    if (ready := _ready_map(ctx, key)) is not None:
        return ready[0], ready[1], False
    rec_id = _start_building(ctx, plan, info, key, params)
    ckpts = JobCheckpoints(ctx.engine, ctx.settings, f"rmap-{rec_id}")
    ckpts.restore()
    lo, hi = progress
    most = len(spec["rates"]) * spec["samples"] * max(settings.ladder)  # the full grid's cell epochs
    trained = 0

    def on_epoch(_done: int, _total: int, _metrics: dict[str, float]) -> None:
        nonlocal trained
        trained += 1
        ckpts.save()
        ctx.report(lo + (hi - lo) * min(1.0, trained / most), f"adaptive map: {trained} cell epochs trained")

    try:
        rmap = pipeline.measure_adaptive_map(
            em, model, thr, settings, fleet, severity, checkpoint_dir=ckpts.dir, on_epoch=on_epoch
        )
    except Exception as exc:
        _mark_failed(ctx, rec_id, exc)
        raise
    _store_ready(ctx, rec_id, rmap, rmap.training_epochs)
    ckpts.discard()
    return rec_id, rmap, True
