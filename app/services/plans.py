"""Base models, plans and model downloads: validation, row creation and views for the routes.

Heavy work (training, planning, retraining) is never done here: a route creates rows
and a job, and a worker runs it (see `workers.handlers`).
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import JSON, func, literal_column, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from accelerator.faults import FaultMap, bypass_faulty_pes, bypass_pes
from app.db.base import utcnow
from app.db.models import (
    PENDING_LATE_JOB,
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
from app.services.errors import Conflict, Invalid, NotFound
from app.services.pagination import encode_cursor


def get_model(session: Session, name_or_id: str) -> ModelRecord:
    q = select(ModelRecord).where(ModelRecord.name == name_or_id)
    bm = session.scalars(q).first()
    # an id: ASCII digits only ('³'.isdigit() is True), and within the id column's range
    if bm is None and name_or_id.isascii() and name_or_id.isdigit() and int(name_or_id) <= INT32_MAX:
        bm = session.get(ModelRecord, int(name_or_id))
    if bm is None:
        raise NotFound.of("base model", name_or_id, ["path", "model"])
    return bm


def model_view(bm: ModelRecord) -> dict[str, Any]:
    return {
        "id": bm.id,
        "name": bm.name,
        "architecture": bm.architecture,
        "dataset": bm.dataset,
        "accelerator": bm.accelerator.name,
        "status": bm.status,
        "error": bm.error,
        "baseline_accuracy": bm.baseline_accuracy,
        "weights_sha256": bm.weights.sha256 if bm.weights is not None else None,
        "config": bm.config,
        "created_at": bm.created_at,
    }


def check_architecture(arch: str) -> None:
    from accelerator.zoo import ARCHS

    if arch not in ARCHS:
        msg = f"unknown architecture {arch!r}; known: {sorted(ARCHS)}"
        raise Invalid(msg, ["body", "architecture"])


def check_dataset_name(name: str, uploaded: bool) -> None:
    if not uploaded and name not in BUILTIN_DATASETS:
        msg = f"unknown dataset {name!r}: use one of {list(BUILTIN_DATASETS)} or upload a .npz as 'dataset_file'"
        raise Invalid(msg, ["body", "dataset"])


def check_new_model(session: Session, name: str, accelerator: str) -> AcceleratorProfile:
    """The profile; `NotFound` for an unknown profile, `Conflict` for a taken name."""
    prof = session.scalars(select(AcceleratorProfile).where(AcceleratorProfile.name == accelerator)).first()
    if prof is None:
        raise NotFound.of("accelerator profile", accelerator, ["body", "accelerator"])
    if session.scalars(select(ModelRecord.id).where(ModelRecord.name == name)).first() is not None:
        msg = f"a base model named {name!r} already exists"
        raise Conflict(msg, ["body", "name"])
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
    try:
        session.flush()
    except IntegrityError:  # registered concurrently since the check: the unique name decides
        session.rollback()
        msg = f"a base model named {name!r} already exists"
        raise Conflict(msg, ["body", "name"]) from None
    return bm


def retry_model(session: Session, name: str) -> ModelRecord:
    """Back to pending, for a new registration job (no commit); `Conflict` unless it failed."""
    bm = get_model(session, name)
    if bm.status != "failed":
        msg = f"base model {bm.name!r} is {bm.status}: only a failed registration can be retried"
        raise Conflict(msg, ["path", "model"])
    bm.status, bm.error = "pending", None
    return bm


# --- plans ----------------------------------------------------------------------------------


def new_plan(session: Session, body: PlanIn, bm: ModelRecord) -> PlanRecord:
    """Add a plan row after checking the model is ready and the selection matches chips (no commit)."""
    if bm.status != "ready":
        msg = f"base model {bm.name!r} is {bm.status}, not ready: wait for its registration job"
        raise Conflict(msg, ["body", "model"])
    sel = body.chips
    q = select(func.count()).select_from(Chip).where(Chip.accelerator_id == bm.accelerator_id)
    if sel.lot is not None:
        q = q.where(Chip.lot == sel.lot)
    if sel.wafer is not None:
        q = q.where(Chip.wafer == sel.wafer)
    if sel.ids:
        ids = list(dict.fromkeys(sel.ids))
        known: set[str] = set()
        for part in chunks(ids):  # a list per statement stays under PostgreSQL's bind-parameter limit
            known.update(
                session.scalars(
                    select(Chip.chip_id).where(Chip.chip_id.in_(part), Chip.accelerator_id == bm.accelerator_id)
                )
            )
        unknown = [c for c in ids if c not in known]
        if unknown:
            msg = f"unknown chip id(s) for accelerator {bm.accelerator.name!r}: {unknown[:10]}"
            raise Invalid(msg, ["body", "chips", "ids"])
        matched = sum(session.scalar(q.where(Chip.chip_id.in_(part))) or 0 for part in chunks(ids))
    else:
        matched = session.scalar(q) or 0
    if not matched:
        shown = sel.model_dump(exclude_defaults=True)
        msg = f"the selection {shown} matches no chip of accelerator {bm.accelerator.name!r}"
        raise Invalid(msg, ["body", "chips"])
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
        params=body.params(),
    )
    session.add(plan)
    session.flush()
    return plan


def get_plan(session: Session, plan_id: int, for_update: bool = False) -> PlanRecord:
    """The plan (404 if none); `for_update` locks its row until the session's transaction ends."""
    plan = session.get(PlanRecord, plan_id, with_for_update=for_update or None, populate_existing=for_update)
    if plan is None:
        raise NotFound.of("plan", plan_id, ["path", "plan_id"])
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


PLAN_CHIP_FIELDS = (
    "chip_id",
    "status",
    "screening",
    "effective_rate",
    "epochs",
    "group_id",
    "accuracy",
    "best_accuracy",
    "reason",
    "bypass",
    "bypassed",
)


def plan_chips_page(doc: dict[str, Any], after: str | None, limit: int) -> tuple[list[dict[str, Any]], str | None]:
    """One page of a plan document's chip states in chip-id order: those after chip id `after`,
    at most `limit`; and the chip id to continue after, or None on the last page."""
    states = sorted(doc.get("chips", []), key=lambda st: str(st["chip_id"]))
    start = 0 if after is None else bisect.bisect_right(states, after, key=lambda st: str(st["chip_id"]))
    page = states[start : start + limit]
    more = start + limit < len(states)
    return [{k: st.get(k) for k in PLAN_CHIP_FIELDS} for st in page], (page[-1]["chip_id"] if more and page else None)


def plan_groups_page(
    session: Session, plan_id: int, after: int | None, limit: int | None
) -> tuple[list[GroupRecord], int | None]:
    """One page of a plan's groups in their order (`index`): those after index `after`, at most
    `limit` (None: all); and the index to continue after, or None on the last page."""
    q = select(GroupRecord).where(GroupRecord.plan_id == plan_id).order_by(GroupRecord.index)
    if after is not None:
        q = q.where(GroupRecord.index > after)
    if limit is None:
        return list(session.scalars(q)), None
    groups = list(session.scalars(q.limit(limit + 1)))
    more = len(groups) > limit
    groups = groups[:limit]
    return groups, (groups[-1].index if more and groups else None)


def plan_view(
    session: Session,
    plan: PlanRecord,
    *,
    chips_after: str | None = None,
    chips_limit: int = 100,
    groups_after: int | None = None,
    groups_limit: int | None = 100,
) -> dict[str, Any]:
    """The plan with one page of its groups (`plan_groups_page`; `groups_limit` None: every
    group) and one page of its chips (`plan_chips_page`); ``next_cursor`` continues the chips,
    ``next_groups_cursor`` the groups."""
    groups, next_group = plan_groups_page(session, plan.id, groups_after, groups_limit)
    pks = {m.chip_pk for g in groups for m in g.members}
    chip_ids = {
        pk: cid
        for part in chunks(sorted(pks))
        for pk, cid in session.execute(select(Chip.id, Chip.chip_id).where(Chip.id.in_(part))).tuples()
    }
    jobs = {
        j.kind: j.id
        for j in session.scalars(select(Job).where(Job.subject == f"plan:{plan.id}").order_by(Job.created_at))
    }
    chips, next_after = plan_chips_page(plan.document or {}, chips_after, chips_limit)
    return {
        "id": plan.id,
        "model": plan.base_model.name,
        "status": plan.status,
        "error": plan.error,
        "constraint": plan.constraint,
        "selection": plan.selection,
        "params": plan.params,
        "summary": plan.summary,
        "resilience_map_id": plan.resilience_map_id,
        "chips": chips,
        "next_cursor": encode_cursor(next_after) if next_after is not None else None,
        "groups": [group_view(g, chip_ids) for g in groups],
        "next_groups_cursor": encode_cursor(next_group) if next_group is not None else None,
        "jobs": jobs,
        "created_at": plan.created_at,
    }


def get_resilience_map(session: Session, map_id: int) -> ResilienceMapRecord:
    rec = session.get(ResilienceMapRecord, map_id)
    if rec is None:
        raise NotFound.of("resilience map", map_id, ["path", "map_id"])
    return rec


def resilience_map_view(rec: ResilienceMapRecord) -> dict[str, Any]:
    return {
        "id": rec.id,
        "status": rec.status,
        "error": rec.error,
        "base_model_id": rec.base_model_id,
        "params": rec.params,
        "training_epochs": rec.training_epochs,
        "map": rec.document,
    }


def plans_using_map(session: Session, map_id: int, *, limit: int, offset: int = 0) -> tuple[int, list[PlanRecord]]:
    """How many plans were built on resilience map `map_id`, and one page of them, newest first."""
    where = PlanRecord.resilience_map_id == map_id
    total = int(session.scalar(select(func.count()).select_from(PlanRecord).where(where)) or 0)
    rows = session.scalars(select(PlanRecord).where(where).order_by(PlanRecord.id.desc()).limit(limit).offset(offset))
    return total, list(rows)


def protected_groups(
    session: Session, plan_id: int, *, limit: int, offset: int = 0
) -> tuple[int, list[dict[str, Any]]]:
    """How many groups of the plan protect a layer (TMR), and one page of them as `group_view`s
    with ``tmr_penalty``: the relative latency increase their retraining job measured (None
    before the group is trained)."""
    where = (GroupRecord.plan_id == plan_id, GroupRecord.protect.is_(True))
    total = int(session.scalar(select(func.count()).select_from(GroupRecord).where(*where)) or 0)
    groups = list(
        session.scalars(select(GroupRecord).where(*where).order_by(GroupRecord.index).limit(limit).offset(offset))
    )
    pks = sorted({m.chip_pk for g in groups for m in g.members})
    chip_ids = {
        pk: cid
        for part in chunks(pks)
        for pk, cid in session.execute(select(Chip.id, Chip.chip_id).where(Chip.id.in_(part))).tuples()
    }
    # the penalty is in the result of the group's latest successful retraining job
    penalty: dict[str, float] = {}
    subjects = [f"group:{g.id}" for g in groups]
    for part in chunks(subjects):
        q = (
            select(Job.subject, Job.result)
            .where(Job.subject.in_(part), Job.kind == "retrain_group", Job.state == "succeeded")
            .order_by(Job.created_at)
        )
        for subject, result in session.execute(q).tuples():
            if subject is not None and (result or {}).get("tmr_penalty") is not None:
                penalty[subject] = float(result["tmr_penalty"])
    return total, [{**group_view(g, chip_ids), "tmr_penalty": penalty.get(f"group:{g.id}")} for g in groups]


# --- downloads ------------------------------------------------------------------------------


def get_group(session: Session, group_id: int) -> GroupRecord:
    g = session.get(GroupRecord, group_id)
    if g is None:
        raise NotFound.of("group", group_id, ["path", "group_id"])
    return g


def group_artifact(g: GroupRecord, fmt: str) -> Artifact:
    art = {"safetensors": g.model, "manifest": g.manifest, "delta": g.delta}[fmt]
    if art is None:
        msg = f"group {g.id} has no trained model yet (status {g.status})"
        raise Conflict(msg, ["path", "group_id"])
    return art


def chip_assignment(session: Session, chip_id: str, model: str | None) -> tuple[Chip, ChipAssignment]:
    chip = session.scalars(select(Chip).where(Chip.chip_id == chip_id)).first()
    if chip is None:
        raise NotFound.of("chip", chip_id, ["path", "chip_id"])
    q = select(ChipAssignment).where(ChipAssignment.chip_pk == chip.id)
    if model is not None:
        q = q.where(ChipAssignment.base_model_id == get_model(session, model).id)
    a = session.scalars(q.order_by(ChipAssignment.updated_at.desc())).first()
    if a is None:
        msg = f"chip {chip_id!r} is in no executed plan yet"
        raise NotFound(msg, ["path", "chip_id"])
    if a.artifact_id is None:
        msg = f"chip {chip_id!r} has no model: {a.status}" + (f" ({a.reason})" if a.reason else "")
        raise Conflict(msg, ["path", "chip_id"], status=a.status)
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


def chip_model_kind(a: ChipAssignment) -> str:
    """What a chip's model file is: a group's model, the fault-robust base, or the base model."""
    if a.group_id is not None:
        return "group_model"
    if a.library_model is not None and a.library_model.kind == "robust":
        return "robust_base"
    return "base_model"


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
        "accuracy": a.test_accuracy,
        "validation_accuracy": a.accuracy,
        "plan_id": a.plan_id,
        "base_model": {
            "name": bm.name,
            "architecture": bm.architecture,
            "dataset": bm.dataset,
            "baseline_accuracy": bm.baseline_accuracy,
        },
        "model": {"sha256": a.artifact.sha256, "size": a.artifact.size, "file": "model.safetensors"},
        "kind": chip_model_kind(a),
        "library_model": a.library_model.key if a.library_model is not None else None,
        "bypass": chip_bypass(chip, a.bypass, a.group.fused_map if a.group is not None else None),
        "group": group_manifest,
    }
    return json.dumps(doc, sort_keys=True, indent=2).encode()


# --- chips that arrive after a plan ran -------------------------------------------------------


IN_CHUNK = 10_000  # values per IN (...) list: PostgreSQL takes at most 65,535 bind parameters a statement


def chunks(values: Sequence[Any], size: int = IN_CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def late_chips_subject(accelerator_id: int) -> str:
    """The subject of an accelerator's late-chip jobs: at most one of them is pending at a time."""
    return f"late-chips:{accelerator_id}"


# json arrays concatenated: the pending job's chip pks, then the new ones (`excluded`)
MERGED_PKS = {
    "postgresql": "json_build_object('chip_pks', "
    "(jobs.params -> 'chip_pks')::jsonb || (excluded.params -> 'chip_pks')::jsonb)",
    "sqlite": "json_set(jobs.params, '$.chip_pks', json((SELECT json_group_array(value) FROM ("
    "SELECT value FROM json_each(jobs.params, '$.chip_pks') "
    "UNION ALL SELECT value FROM json_each(excluded.params, '$.chip_pks')))))",
}


def late_assignment_jobs(
    session: Session, chip_ids: Sequence[str], created_by: str | None = None
) -> list[tuple[str, bool]]:
    """In the caller's transaction (it commits, then enqueues the new jobs): after chips were
    created or replaced, each of their accelerators that an executed plan covers gets their pks
    into its pending late-chip job (`workers.handlers.late_chips.assign_chip`): the one job, queued and not yet
    taken by a worker, that every late chip joins until a worker runs it, so a stream of single
    POSTs queues one job, not one each. Returns (job id, created: the caller must enqueue it).

    Race-free: an upsert on the partial unique index `uq_jobs_pending_late_chips`. A worker's claim
    (state 'running', attempts + 1) takes the job out of the index; a chip added in the same
    instant either joins the job before the claim reads its params, or starts the next one.
    Created with the chips, the job cannot be missed: a crash between the two would otherwise
    leave chips that no plan ever serves."""
    if not chip_ids:
        return []
    executed = set(
        session.scalars(
            select(ModelRecord.accelerator_id)
            .join(PlanRecord, PlanRecord.base_model_id == ModelRecord.id)
            .where(PlanRecord.status == "executed")
            .distinct()
        )
    )
    if not executed:
        return []  # the common case at ingest time: one cheap query
    pks: dict[int, list[int]] = {}
    for part in chunks(list(dict.fromkeys(chip_ids))):
        for pk, a in session.execute(select(Chip.id, Chip.accelerator_id).where(Chip.chip_id.in_(part))):
            if a in executed:
                pks.setdefault(a, []).append(pk)
    # accelerators in one order, so that two transactions lock their pending jobs in the same order
    return [_join_pending_job(session, a, sorted(pks[a]), created_by) for a in sorted(pks)]


def _join_pending_job(
    session: Session, accelerator_id: int, pks: list[int], created_by: str | None
) -> tuple[str, bool]:
    from app.services import jobs as jobsvc

    dialect = session.get_bind().dialect.name
    now = utcnow()
    new_id = jobsvc.new_job_id()
    values = {
        "id": new_id,
        "kind": "assign_chip",
        "state": "queued",
        "progress": 0.0,
        "message": "queued",
        "params": {"chip_pks": pks},
        "attempts": 0,
        "subject": late_chips_subject(accelerator_id),
        "created_by": created_by,
        "created_at": now,
        "enqueued_at": now,
    }
    ins = (pg_insert if dialect == "postgresql" else sqlite_insert)(Job).values(**values)
    stmt = ins.on_conflict_do_update(
        index_elements=["subject"],
        index_where=text(PENDING_LATE_JOB),
        set_={"params": literal_column(MERGED_PKS[dialect], JSON)},
    ).returning(Job.id)
    job_id = session.execute(stmt).scalar_one()
    return job_id, job_id == new_id
