"""Planning: screening against the library, robust base, map or ladder, grouping."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from sqlalchemy.orm import Session
from torch import nn

from accelerator import FaultMap
from app.db.models import (
    PlanRecord,
)
from app.services.artifacts import store_bytes
from planner import AccuracyConstraint, Plan, ResilienceMap, SiteSeverity, measure_site_severity
from planner.economics import fap_t_epochs_at_least
from planner.plan import NEEDS_NOTHING
from workers import pipeline
from workers.checkpoints import JobCheckpoints
from workers.export import state_dict_bytes
from workers.handlers.maps import ensure_adaptive_map, ensure_resilience_map
from workers.jobs import JobContext, handler
from workers.store import (
    SAFETENSORS,
    add_to_library,
    load_base_model,
    load_library,
    plan_failed,
    plan_info,
    plan_settings,
    selected_maps,
    set_plan_status,
    sync_groups,
    train_config,
)


class RobustTraining:
    """Trains the robust base in a plan job (a `pipeline.RobustTrainer`), rung by rung
    (`pipeline.grow_robust_base`), each rung checkpointed every epoch into `ckpts` (the
    plan's, stored through the artifact store), so a job taken over, on this machine or
    another, resumes at its last finished epoch. `resumed_from_epoch`: the robust-base epoch
    this run resumed at from a stored checkpoint (0: it trained from the start)."""

    def __init__(
        self,
        ctx: JobContext,
        em: pipeline.Emulation,
        settings: pipeline.FleetSettings,
        ckpts: JobCheckpoints,
    ) -> None:
        self.ctx, self.em, self.settings, self.ckpts = ctx, em, settings, ckpts
        self.resumed_from_epoch = 0
        self._restored = False

    def __call__(self, model: nn.Module, maps: Sequence[FaultMap], start: int, epochs: int) -> nn.Module:
        if not self._restored:  # once, before the first rung: later rungs' files are this run's own
            self.ckpts.restore()
            self._restored = True
        ckpt = self.ckpts.path(f"robust-{start:04d}.pt")
        if ckpt.exists():  # an earlier attempt's rung: training goes on from its stored epoch
            stored = int(torch.load(ckpt, map_location="cpu", weights_only=False)["epoch"])
            self.resumed_from_epoch = max(self.resumed_from_epoch, start + stored)
        total = self.settings.robust_ladder[-1]

        def on_epoch(e: int, _n: int, m: dict[str, float]) -> None:
            done = start + e
            self.ctx.check()
            self.ckpts.save()
            self.ctx.report(
                0.3 + 0.2 * done / total, f"robust base: epoch {done}, loss {m.get('loss', float('nan')):.4f}"
            )

        return pipeline.train_robust_base(
            self.em,
            model,
            maps,
            epochs=epochs,
            lr=self.settings.robust_lr,
            seed=self.settings.seed,
            start=start,
            checkpoint=ckpt,
            on_progress=on_epoch,
        )


@handler("plan", on_failure=plan_failed)
def build_plan(ctx: JobContext) -> dict[str, Any]:
    """`pipeline.plan_batch` over the plan's chips: screening against the base model's library,
    a robust base where it pays (stored in the library), a measured map where it pays (the
    adaptive one built in this job, or the full grid fanned out) or the ladder, then
    `plan_fleet`. What it cost goes into the plan's ledger."""
    plan = plan_info(ctx.engine, int(ctx.params["plan_id"]))
    if plan.document is not None:
        return {"plan_id": plan.id, "summary": plan.document.get("summary")}  # already built (idempotent)
    set_plan_status(ctx.engine, plan.id, "planning")
    loaded = load_base_model(ctx.engine, plan.base_model_id)
    maps = selected_maps(ctx.engine, plan, loaded.array)
    if not maps:
        raise ValueError("the plan selects no chips")
    settings = plan_settings(plan.params)
    em = loaded.emulation(train_config(plan.params, loaded.device))
    constraint = AccuracyConstraint.from_dict(plan.constraint)
    library, _ = load_library(ctx.engine, loaded)
    rmap_id: int | None = None

    def build_map(
        model: nn.Module, thr: pipeline.Thresholds, fleet: pipeline.MapFleet
    ) -> tuple[ResilienceMap, SiteSeverity]:
        nonlocal rmap_id
        # severity first: an adaptive map places the chips with it
        severity = measure_site_severity(
            loaded.array,
            lambda fm: em.validate(model, fm, kind="severity"),
            thr.baseline_validation,
            rate=settings.map_rates[len(settings.map_rates) // 2],
            samples=1,
            seed=settings.seed,
        )
        if settings.map_cells == "adaptive":  # built here, charged to em.ledger when built
            rmap_id, rmap, _ = ensure_adaptive_map(
                ctx, plan, em, model, thr, settings, fleet, severity, progress=(0.5, 0.8)
            )
            return rmap, severity
        rmap_id, rmap, built = ensure_resilience_map(ctx, plan, thr.baseline_validation, progress=(0.5, 0.8))
        if built:
            em.ledger.train("resilience_map", em.cfg.passes(rmap.training_epochs))
        return rmap, severity

    n = len(maps)
    ckpts = JobCheckpoints(ctx.engine, ctx.settings, f"robust-plan{plan.id}")
    robust = RobustTraining(ctx, em, settings, ckpts)

    def progress(msg: str) -> None:
        ctx.report(0.05, msg)

    ctx.report(0.02, f"screening {n} chips against the model library")
    batch = pipeline.plan_batch(
        em,
        loaded.model,
        maps,
        constraint,
        settings,
        library=library,
        train_robust=robust,
        build_map=build_map,
        on_progress=progress,
    )
    if batch.decisions["robust_base"].get("trained") and any(lm.key == "robust" for lm in batch.library):
        robust_model = batch.model("robust").model
        with Session(ctx.engine, expire_on_commit=False) as s:
            art = store_bytes(
                s, state_dict_bytes(robust_model.state_dict(), {"robust_base": loaded.info.name}), "model", SAFETENSORS
            )
            s.commit()
            art_id = art.id
        epochs = int(batch.decisions["robust_base"]["epochs"])
        add_to_library(ctx.engine, loaded.info.id, "robust", "robust", art_id, training_epochs=epochs)
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
    ckpts.discard()  # the robust base, if any, is in the library; a re-run returns the stored plan
    return {"plan_id": plan.id, "summary": doc.summary(), "robust_base_resumed_from_epoch": robust.resumed_from_epoch}


def plan_summary(
    doc: Plan, ledger: pipeline.Ledger, thr: pipeline.Thresholds, decisions: dict[str, Any]
) -> dict[str, Any]:
    """A plan's summary: the planner's counts, every cost so far and the FAP+T estimate beside it."""
    failing = sum(1 for st in doc.chips.values() if st.status != NEEDS_NOTHING)
    return {
        **doc.summary(),
        **ledger.to_dict(),
        "ledger": ledger.state(),
        "fap_t_epochs_at_least": fap_t_epochs_at_least(failing, doc.resilience_map.smallest_positive_epochs),
        "thresholds": {
            "validation": thr.decision,
            "test": thr.verification,
            "baseline_validation": thr.baseline_validation,
            "baseline_test": thr.baseline_test,
        },
        "decisions": decisions,
        "threshold": thr.decision,
    }
