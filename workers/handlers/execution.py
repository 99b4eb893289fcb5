"""Executing a plan: one retraining job per group, verification, replans, chip assignments."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import (
    Chip,
    ChipAssignment,
    GroupRecord,
    LibraryModelRecord,
    PlanRecord,
)
from planner import Group, Plan
from planner.plan import NEEDS_NOTHING, UNRECOVERABLE, VERIFIED
from workers import pipeline
from workers.checkpoints import JobCheckpoints
from workers.jobs import JobContext, gather_children, handler
from workers.store import (
    PlanInfo,
    add_to_library,
    find_group,
    group_library_key,
    library_artifacts,
    library_model,
    load_base_model,
    load_group_model,
    load_library,
    plan_failed,
    plan_info,
    set_plan_status,
    store_group_model,
    stored_thresholds,
    sync_groups,
    train_config,
    upsert_assignment,
)


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
    loaded = load_base_model(ctx.engine, plan.base_model_id)
    em = loaded.emulation(train_config(plan.params, loaded.device))
    group_base = library_model(ctx.engine, loaded, (plan.summary or {}).get("group_base", "base"))
    start = group_base
    if g.warm_from:  # a replan that continues an earlier group's retrained model
        with Session(ctx.engine, expire_on_commit=False) as s:
            parent = s.scalars(
                select(GroupRecord).where(GroupRecord.plan_id == plan_id, GroupRecord.key == g.warm_from)
            ).first()
            sha = parent.model.sha256 if parent is not None and parent.model is not None else None
        if sha is None:
            raise ValueError(f"group {key} continues group {g.warm_from}, which has no trained model")
        start = load_group_model(loaded, sha)
    ckpts = JobCheckpoints(ctx.engine, ctx.settings, f"group-{group_id}")
    if stored_sha is None:
        ckpts.restore()  # another machine's epochs, with the database artifact backend
    resumed_from = pipeline.checkpointed_epochs(ckpts.dir)
    note = f", resuming after epoch {resumed_from}" if resumed_from else ""
    ctx.report(0.02, f"retraining {len(g.members)} chip(s) for {g.epochs} epochs{note}")

    def on_epoch(done: int, total: int, metrics: dict[str, float]) -> None:
        ctx.check()  # a job taken over stores nothing more
        ckpts.save()  # before the row says `epochs_done`: the row never claims an unstored epoch
        ctx.report(
            0.05 + 0.8 * done / max(total, 1),
            f"epoch {done}/{total}: loss {metrics.get('loss', float('nan')):.4f}",
            checkpoint={"epochs_done": done, "resumed_from": resumed_from},
        )

    if stored_sha is not None:  # trained before this job was re-run: verify only
        ctx.report(0.85, "model already stored: verifying it again")
        trained = load_group_model(loaded, stored_sha)
        result = pipeline.verify_members(em, trained, g, doc.maps, *pipeline.protection(em, g, group_base))
    else:
        result = pipeline.retrain_and_verify(
            em,
            start,
            g,
            doc.maps,
            doc.resilience_map.epochs,
            group_base=group_base,
            checkpoint_dir=ckpts.dir,
            on_progress=on_epoch,
        )
    assert result.model is not None
    if stored_sha is None:
        store_group_model(ctx.engine, loaded, plan, doc, g, group_id, result, resumed_from)
    ckpts.discard()  # the model is stored; a re-run only verifies again
    return {**result.to_dict(), "ledger": em.ledger.state(), "resumed_from_epoch": resumed_from}


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
                    training_epochs=g.epochs,
                )

    doc = pipeline.run_rounds(doc, fan_out, on_round=store_round)
    ctx.report(0.92, "assigning every chip the model it runs, verified on the test split")
    loaded = load_base_model(ctx.engine, plan.base_model_id)
    em = loaded.emulation(train_config(plan.params, loaded.device))
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


def assign_plan_chips(engine: Engine, em: pipeline.Emulation, plan: PlanInfo, doc: Plan) -> None:
    """Record, for every chip of the plan, the model it runs (idempotent upsert); chips that
    need no retraining are verified on the test split with their library model first."""
    loaded = load_base_model(engine, plan.base_model_id)
    library, lib_ids = load_library(engine, loaded)
    pipeline.verify_served(em, doc, library)
    weights = library_artifacts(engine, loaded.info.id)
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
