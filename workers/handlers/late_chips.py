"""Chips that arrive after a plan ran: the library serves them."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

import accelerator as acc
from accelerator import FaultMap
from app.db.models import (
    Chip,
    LibraryModelRecord,
    ModelRecord,
    PlanRecord,
)
from app.schemas.plans import PlanParams
from workers import pipeline
from workers.jobs import JobContext, handler
from workers.store import (
    library_artifacts,
    load_base_model,
    load_library,
    plan_settings,
    stored_thresholds,
    train_config,
    upsert_assignment,
)

log = logging.getLogger("faultfleet.fleet")


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
        latest: dict[int, tuple[int, PlanParams, dict[str, Any]]] = {}
        # the latest executed plan of each base model: its settings and thresholds, never its document
        for plan_id, model_id, params, summary in s.execute(
            select(PlanRecord.id, PlanRecord.base_model_id, PlanRecord.params, PlanRecord.summary)
            .join(ModelRecord)
            .where(ModelRecord.accelerator_id.in_(accels), PlanRecord.status == "executed")
            .order_by(PlanRecord.id.desc())
        ).tuples():
            latest.setdefault(model_id, (plan_id, PlanParams.stored(params), dict(summary or {})))
    out: dict[str, dict[str, str]] = {cid: {} for cid, _, _ in chips.values()}
    for model_id, (plan_id, params, summary) in latest.items():
        loaded = load_base_model(ctx.engine, model_id)
        em = loaded.emulation(train_config(params, loaded.device))
        thr = stored_thresholds(summary)
        library, lib_ids = load_library(ctx.engine, loaded)
        mine = [
            (pk, cid, FaultMap.from_dict(fm, array=loaded.array))
            for pk, (cid, fm, a) in chips.items()
            if a == loaded.info.accelerator_id
        ]
        if not mine:
            continue
        ctx.report(0.1, f"screening {len(mine)} chip(s) against the library of base model {loaded.info.name}")
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
