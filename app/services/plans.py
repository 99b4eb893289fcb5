"""Base models, plans and model downloads: validation, row creation and views for the routes.

Heavy work (training, planning, retraining) is never done here: a route creates rows
and a job, and a worker runs it (see `workers.fleet`).
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from accelerator.faults import FaultMap, bypass_faulty_pes, bypass_pes
from app.api.errors import ApiError
from app.db.models import (
    AcceleratorProfile,
    Artifact,
    Chip,
    ChipAssignment,
    GroupRecord,
    Job,
    ModelRecord,
    PlanRecord,
    ResilienceMapRecord,
)
from app.schemas.common import INT32_MAX
from app.schemas.plans import BUILTIN_DATASETS, PlanIn


def _not_found(what: str, key: Any, loc: list[str | int]) -> ApiError:
    return ApiError(404, f"no {what} {key!r}", [{"loc": loc, "msg": "not found"}])


def get_model(session: Session, name_or_id: str) -> ModelRecord:
    q = select(ModelRecord).where(ModelRecord.name == name_or_id)
    bm = session.scalars(q).first()
    # an id: ASCII digits only ('³'.isdigit() is True), and within the id column's range
    if bm is None and name_or_id.isascii() and name_or_id.isdigit() and int(name_or_id) <= INT32_MAX:
        bm = session.get(ModelRecord, int(name_or_id))
    if bm is None:
        raise _not_found("base model", name_or_id, ["path", "model"])
    return bm


def model_view(bm: ModelRecord) -> dict[str, Any]:
    return {
        "id": bm.id,
        "name": bm.name,
        "architecture": bm.architecture,
        "dataset": bm.dataset,
        "accelerator": bm.accelerator.name,
        "status": bm.status,
        "baseline_accuracy": bm.baseline_accuracy,
        "weights_sha256": bm.weights.sha256 if bm.weights is not None else None,
        "config": bm.config,
        "created_at": bm.created_at,
    }


def check_architecture(arch: str) -> None:
    from accelerator.zoo import ARCHS

    if arch not in ARCHS:
        msg = f"unknown architecture {arch!r}; known: {sorted(ARCHS)}"
        raise ApiError(422, msg, [{"loc": ["body", "architecture"], "msg": msg}])


def check_dataset_name(name: str, uploaded: bool) -> None:
    if not uploaded and name not in BUILTIN_DATASETS:
        msg = f"unknown dataset {name!r}: use one of {list(BUILTIN_DATASETS)} or upload a .npz as 'dataset_file'"
        raise ApiError(422, msg, [{"loc": ["body", "dataset"], "msg": msg}])


def check_new_model(session: Session, name: str, accelerator: str) -> AcceleratorProfile:
    """404 for an unknown profile, 409 for a taken name; the profile otherwise."""
    prof = session.scalars(select(AcceleratorProfile).where(AcceleratorProfile.name == accelerator)).first()
    if prof is None:
        raise _not_found("accelerator profile", accelerator, ["body", "accelerator"])
    if session.scalars(select(ModelRecord.id).where(ModelRecord.name == name)).first() is not None:
        msg = f"a base model named {name!r} already exists"
        raise ApiError(409, msg, [{"loc": ["body", "name"], "msg": msg}])
    return prof


def new_model(
    session: Session, *, name: str, architecture: str, dataset: str, accelerator: str, config: dict[str, Any]
) -> ModelRecord:
    """Add a pending base model row (no commit), after `check_new_model`."""
    prof = check_new_model(session, name, accelerator)
    bm = ModelRecord(
        name=name, architecture=architecture, dataset=dataset, accelerator_id=prof.id, config=config, status="pending"
    )
    session.add(bm)
    session.flush()
    return bm


# --- plans ----------------------------------------------------------------------------------


def new_plan(session: Session, body: PlanIn, bm: ModelRecord) -> PlanRecord:
    """Add a plan row after checking the model is ready and the selection matches chips (no commit)."""
    if bm.status != "ready":
        msg = f"base model {bm.name!r} is {bm.status}, not ready: wait for its registration job"
        raise ApiError(409, msg, [{"loc": ["body", "model"], "msg": msg}])
    sel = body.chips
    q = select(func.count()).select_from(Chip).where(Chip.accelerator_id == bm.accelerator_id)
    if sel.lot is not None:
        q = q.where(Chip.lot == sel.lot)
    if sel.wafer is not None:
        q = q.where(Chip.wafer == sel.wafer)
    if sel.ids:
        known = set(
            session.scalars(
                select(Chip.chip_id).where(Chip.chip_id.in_(sel.ids), Chip.accelerator_id == bm.accelerator_id)
            )
        )
        unknown = [c for c in sel.ids if c not in known]
        if unknown:
            msg = f"unknown chip id(s) for accelerator {bm.accelerator.name!r}: {unknown[:10]}"
            raise ApiError(422, msg, [{"loc": ["body", "chips", "ids"], "msg": msg}])
        q = q.where(Chip.chip_id.in_(sel.ids))
    if not session.scalar(q):
        shown = sel.model_dump(exclude_defaults=True)
        msg = f"the selection {shown} matches no chip of accelerator {bm.accelerator.name!r}"
        raise ApiError(422, msg, [{"loc": ["body", "chips"], "msg": msg}])
    c = body.constraint
    constraint = (
        {"kind": "relative", "max_drop": c.max_drop}
        if c.max_drop is not None
        else {"kind": "absolute", "min_accuracy": c.min_accuracy}
    )
    plan = PlanRecord(
        base_model_id=bm.id,
        status="pending",
        constraint=constraint,
        selection=sel.model_dump(exclude_defaults=True),
        params={
            "max_group_size": body.max_group_size,
            "schedule": body.schedule,
            "bypass": body.bypass,
            "resilience": body.resilience.model_dump(),
            "train": body.train.model_dump(),
            "seed": body.seed,
        },
    )
    session.add(plan)
    session.flush()
    return plan


def get_plan(session: Session, plan_id: int) -> PlanRecord:
    plan = session.get(PlanRecord, plan_id)
    if plan is None:
        raise _not_found("plan", plan_id, ["path", "plan_id"])
    return plan


def group_view(g: GroupRecord, chip_ids: dict[int, str]) -> dict[str, Any]:
    return {
        "id": g.id,
        "key": g.key,
        "round": g.round,
        "reason": g.reason,
        "status": g.status,
        "members": [
            {
                "chip_id": chip_ids[m.chip_pk],
                "revision": m.chip_revision,
                "status": m.status,
                "accuracy": m.accuracy,
                "reason": m.reason,
            }
            for m in g.members
        ],
        "epochs": g.epochs,
        "schedule": g.schedule,
        "fused_rate": g.fused_rate,
        "fused_digest": g.fused_digest,
        "protect": g.protect,
        "protect_layer": g.protect_layer,
        "model_sha256": g.model.sha256 if g.model is not None else None,
        "manifest_sha256": g.manifest.sha256 if g.manifest is not None else None,
    }


def plan_view(session: Session, plan: PlanRecord) -> dict[str, Any]:
    groups = list(
        session.scalars(select(GroupRecord).where(GroupRecord.plan_id == plan.id).order_by(GroupRecord.index))
    )
    pks = {m.chip_pk for g in groups for m in g.members}
    chip_ids = (
        dict(session.execute(select(Chip.id, Chip.chip_id).where(Chip.id.in_(pks))).tuples().all()) if pks else {}
    )
    jobs = {
        j.kind: j.id
        for j in session.scalars(select(Job).where(Job.subject == f"plan:{plan.id}").order_by(Job.created_at))
    }
    doc = plan.document or {}
    return {
        "id": plan.id,
        "model": plan.base_model.name,
        "status": plan.status,
        "constraint": plan.constraint,
        "selection": plan.selection,
        "params": plan.params,
        "summary": plan.summary,
        "resilience_map_id": plan.resilience_map_id,
        "chips": [
            {
                k: st.get(k)
                for k in (
                    "chip_id",
                    "status",
                    "screening",
                    "effective_rate",
                    "amount",
                    "group_id",
                    "accuracy",
                    "best_accuracy",
                    "reason",
                    "bypass",
                    "bypassed",
                )
            }
            for st in doc.get("chips", [])
        ],
        "groups": [group_view(g, chip_ids) for g in groups],
        "jobs": jobs,
        "created_at": plan.created_at,
    }


def get_resilience_map(session: Session, map_id: int) -> ResilienceMapRecord:
    rec = session.get(ResilienceMapRecord, map_id)
    if rec is None:
        raise _not_found("resilience map", map_id, ["path", "map_id"])
    return rec


def resilience_map_view(rec: ResilienceMapRecord) -> dict[str, Any]:
    return {
        "id": rec.id,
        "status": rec.status,
        "base_model_id": rec.base_model_id,
        "params": rec.params,
        "training_epochs": rec.training_epochs,
        "map": rec.document,
    }


# --- downloads ------------------------------------------------------------------------------


def get_group(session: Session, group_id: int) -> GroupRecord:
    g = session.get(GroupRecord, group_id)
    if g is None:
        raise _not_found("group", group_id, ["path", "group_id"])
    return g


def group_artifact(g: GroupRecord, fmt: str) -> Artifact:
    art = {"safetensors": g.model, "manifest": g.manifest, "delta": g.delta}[fmt]
    if art is None:
        msg = f"group {g.id} has no trained model yet (status {g.status})"
        raise ApiError(409, msg, [{"loc": ["path", "group_id"], "msg": msg}])
    return art


def chip_assignment(session: Session, chip_id: str, model: str | None) -> tuple[Chip, ChipAssignment]:
    chip = session.scalars(select(Chip).where(Chip.chip_id == chip_id)).first()
    if chip is None:
        raise _not_found("chip", chip_id, ["path", "chip_id"])
    q = select(ChipAssignment).where(ChipAssignment.chip_pk == chip.id)
    if model is not None:
        q = q.where(ChipAssignment.base_model_id == get_model(session, model).id)
    a = session.scalars(q.order_by(ChipAssignment.updated_at.desc())).first()
    if a is None:
        msg = f"chip {chip_id!r} is in no executed plan yet"
        raise ApiError(404, msg, [{"loc": ["path", "chip_id"], "msg": msg}])
    if a.artifact_id is None:
        msg = f"chip {chip_id!r} has no model: {a.status}" + (f" ({a.reason})" if a.reason else "")
        raise ApiError(409, msg, [{"loc": ["path", "chip_id"], "msg": msg}], status=a.status)
    return chip, a


def chip_bypass(chip: Chip, policy: str | None, group_fused: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The PEs a chip must be configured to bypass for its model (beyond its dead ones), or None
    when there are none: its bypass policy's, and with a group model (`group_fused`, the
    group's fused map) that map's dead PEs as well (`planner.group_deployment`)."""
    own = FaultMap.from_dict(chip.fault_map)
    deployed = bypass_faulty_pes(own, policy) if policy else own
    if group_fused is not None:
        deployed = bypass_pes(deployed, FaultMap.from_dict(group_fused, array=own.array).dead_pes)
    pes = sorted(deployed.dead_pes - own.dead_pes)
    if policy is None and not pes:
        return None
    return {"policy": policy, "pes": [list(pe) for pe in pes]}


def chip_manifest(session: Session, chip: Chip, a: ChipAssignment) -> bytes:
    """The chip's own manifest: its group's (with this chip's accuracy) or the pruned base model's."""
    bm = session.get(ModelRecord, a.base_model_id)
    assert bm is not None and a.artifact is not None
    group_manifest = None
    if a.group is not None and a.group.manifest is not None:
        from app.services.artifacts import read_artifact

        group_manifest = json.loads(read_artifact(a.group.manifest.sha256))
    doc = {
        "chip_id": chip.chip_id,
        "chip_revision": chip.revision,
        "fault_map_digest": chip.faults_digest,
        "status": a.status,
        "source": a.source,
        "accuracy": a.accuracy,
        "plan_id": a.plan_id,
        "base_model": {
            "name": bm.name,
            "architecture": bm.architecture,
            "dataset": bm.dataset,
            "baseline_accuracy": bm.baseline_accuracy,
        },
        "model": {"sha256": a.artifact.sha256, "size": a.artifact.size, "file": "model.safetensors"},
        "kind": "group_model" if a.group_id is not None else "base_model_pruned_for_dead_pes",
        "bypass": chip_bypass(chip, a.bypass, a.group.fused_map if a.group is not None else None),
        "group": group_manifest,
    }
    return json.dumps(doc, sort_keys=True, indent=2).encode()


# --- chips that arrive after a plan ran -------------------------------------------------------


def queue_late_assignments(chip_ids: list[str]) -> str | None:
    """After chips were created or replaced: if an executed plan covers their accelerator, start one
    job that tries them on that plan's group models (see `workers.fleet.assign_chip`). Returns its id."""
    from app.core.config import get_settings
    from app.core.queue import get_celery
    from app.db.session import get_sessionmaker
    from app.services import jobs as jobsvc

    if not chip_ids:
        return None
    with get_sessionmaker()() as s:
        if s.scalars(select(PlanRecord.id).where(PlanRecord.status == "executed").limit(1)).first() is None:
            return None  # the common case at ingest time: one cheap query
        rows = s.execute(select(Chip.id, Chip.accelerator_id).where(Chip.chip_id.in_(chip_ids))).tuples().all()
        executed = set(
            s.scalars(
                select(ModelRecord.accelerator_id)
                .join(PlanRecord, PlanRecord.base_model_id == ModelRecord.id)
                .where(PlanRecord.status == "executed", ModelRecord.accelerator_id.in_({a for _, a in rows}))
            )
        )
        pks = sorted(pk for pk, a in rows if a in executed)
        if not pks:
            return None
        job = jobsvc.create_job(s, "assign_chip", {"chip_pks": pks}, subject="late-chips")
        s.commit()
        job_id = job.id
    jobsvc.enqueue(job_id, get_celery(), get_settings())
    return job_id
