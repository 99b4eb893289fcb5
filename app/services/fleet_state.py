"""Where each chip stands in the fleet's retraining, for metrics and the dashboard.

A chip's state, most settled first:
- from its latest model assignment: `verified` (a group model passed on its own map),
  `served_by_library` (a model of an executed plan took it after the plan ran, no retraining),
  `needs_nothing` (the base model meets the constraint), `unrecoverable`, `waiting` (a late
  chip no model served; for the next plan);
- else from its group in a plan: `retraining` (the plan is executing and the group is not done)
  or `planned`;
- else `unplanned`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db.models import Chip, ChipAssignment, GroupMember, GroupRecord, PlanRecord

CHIP_STATES = (
    "unplanned",
    "planned",
    "retraining",
    "needs_nothing",
    "verified",
    "served_by_library",
    "unrecoverable",
    "waiting",
)


def _assignment_state(status: str, source: str) -> str:
    if source == "late" and status in ("verified", "needs_nothing"):
        return "served_by_library"  # a library model (a group's, or the base) took it, no retraining
    return status if status in CHIP_STATES else "waiting"


def chip_states(session: Session, chip_pks: Iterable[int] | None = None) -> dict[int, str]:
    """chip pk -> state for the chips given (every chip with a plan or an assignment when None);
    a chip absent from the answer is `unplanned`."""
    pks = list(chip_pks) if chip_pks is not None else None
    if pks is not None and not pks:
        return {}
    qa = select(ChipAssignment.chip_pk, ChipAssignment.status, ChipAssignment.source).order_by(
        ChipAssignment.updated_at, ChipAssignment.id
    )
    qg = (
        select(GroupMember.chip_pk, GroupRecord.status, PlanRecord.status)
        .join(GroupRecord, GroupMember.group_id == GroupRecord.id)
        .join(PlanRecord, GroupRecord.plan_id == PlanRecord.id)
    )
    if pks is not None:
        qa = qa.where(ChipAssignment.chip_pk.in_(pks))
        qg = qg.where(GroupMember.chip_pk.in_(pks))
    states: dict[int, str] = {}
    for pk, status, source in session.execute(qa):
        states[pk] = _assignment_state(status, source)  # ordered by time: the latest wins
    assigned = set(states)
    for pk, group_status, plan_status in session.execute(qg):
        if pk in assigned:
            continue
        busy = plan_status == "executing" and group_status in ("pending", "trained")
        if busy or pk not in states:
            states[pk] = "retraining" if busy else "planned"
    return states


def chip_state_counts(session: Session) -> dict[str, int]:
    total = int(session.scalar(select(func.count()).select_from(Chip)) or 0)
    counts = dict.fromkeys(CHIP_STATES, 0)
    states = chip_states(session)
    for state in states.values():
        counts[state] += 1
    counts["unplanned"] = max(total - len(states), 0)
    return counts


def group_job_progress(session: Session, plan_id: int) -> list[dict[str, Any]]:
    """The plan's jobs, oldest first: what the plan page shows moving."""
    from app.db.models import Job

    rows = session.scalars(
        select(Job)
        .where(
            (Job.subject == f"plan:{plan_id}")
            | Job.parent_id.in_(select(Job.id).where(Job.subject == f"plan:{plan_id}"))
        )
        .order_by(Job.created_at, Job.id)
    )
    return [
        {
            "id": j.id,
            "kind": j.kind,
            "subject": j.subject,
            "state": j.state,
            "fraction": j.progress,
            "message": j.message,
        }
        for j in rows
    ]
