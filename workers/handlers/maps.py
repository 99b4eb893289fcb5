"""Resilience maps: one child job per cell, assembled and cached by `resilience_key`."""

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
from planner import CellTask, ResilienceMap
from workers import pipeline
from workers.export import code_version
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
    """One cell task of a resilience map: retrain on one sampled map, accuracy after each amount."""
    task = CellTask.from_dict(ctx.params["task"])
    loaded = load_base_model(ctx.engine, int(ctx.params["model_id"]))
    ctx.report(0.1, f"rate {task.rate:.4f} sample {task.sample}: retraining {task.training_epochs} epochs")
    em = loaded.emulation(train_config(TrainIn.model_validate(ctx.params["train"], strict=False), loaded.device))
    accs = pipeline.measure_cell(loaded.model, loaded.array, em.validation, task, em.cfg)
    return {"task": task.to_dict(), "accuracies": [float(a) for a in accs]}


def ensure_resilience_map(
    ctx: JobContext, plan: PlanInfo, baseline: float, progress: tuple[float, float]
) -> tuple[int, ResilienceMap, bool]:
    """The cached map for the plan's model, dataset, array and grid (id, map, whether this
    call measured it); built by fanning out cells (on the validation split) if missing.
    `baseline`: the base model's fault-free validation accuracy."""
    grid = plan.params.resilience
    spec: dict[str, Any] = {
        "rates": sorted(grid.rates),
        "epochs": sorted(grid.epochs),
        "samples": grid.samples,
        "seed": grid.seed,
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
