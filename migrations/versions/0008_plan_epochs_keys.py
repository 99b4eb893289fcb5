"""stored plan documents say `epochs` where they said `amount` (issue 17: one meaning per name)

Rewrites the JSON the planner stored before the rename, so every reader (`planner.Plan.from_dict`,
the API's chip pages, the dashboard) sees one name:

- `plans.document`: `groups[].amount` -> `groups[].epochs`, `chips[].amount` -> `chips[].epochs`,
  `chips[].history[].amount` -> `chips[].history[].epochs`, `per_chip_fat_amount` ->
  `per_chip_fat_epochs_each` (top level and in its `summary`);
- `plans.summary`, and the `summary` in the results of `plan` and `execute_plan` jobs:
  `per_chip_fat_amount` -> `per_chip_fat_epochs_each`.

The numbers are unchanged (retraining epochs). No column changes. The downgrade renames back.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05 13:00:00
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_EPOCHS, NEW_EPOCHS = "amount", "epochs"
OLD_FAT, NEW_FAT = "per_chip_fat_amount", "per_chip_fat_epochs_each"

plans = sa.table("plans", sa.column("id", sa.Integer), sa.column("document", sa.JSON), sa.column("summary", sa.JSON))
jobs = sa.table("jobs", sa.column("id", sa.String), sa.column("kind", sa.String), sa.column("result", sa.JSON))


def _rename(d: Any, old: str, new: str) -> bool:
    """Rename key `old` of dict `d` to `new` in place (the order of the other keys kept)."""
    if not isinstance(d, dict) or old not in d or new in d:
        return False
    items = [(new if k == old else k, v) for k, v in d.items()]
    d.clear()
    d.update(items)
    return True


def _document(doc: Any, old: str, new: str, old_fat: str, new_fat: str) -> bool:
    if not isinstance(doc, dict):
        return False
    changed = _rename(doc, old_fat, new_fat)
    changed |= _rename(doc.get("summary"), old_fat, new_fat)
    for g in doc.get("groups") or []:
        changed |= _rename(g, old, new)
    for st in doc.get("chips") or []:
        changed |= _rename(st, old, new)
        for h in (st.get("history") or []) if isinstance(st, dict) else []:
            changed |= _rename(h, old, new)
    return changed


def _rewrite(forward: bool) -> None:
    old, new, old_fat, new_fat = (
        (OLD_EPOCHS, NEW_EPOCHS, OLD_FAT, NEW_FAT) if forward else (NEW_EPOCHS, OLD_EPOCHS, NEW_FAT, OLD_FAT)
    )
    conn = op.get_bind()
    # one row at a time: a plan document holds every chip of its fleet
    for (plan_id,) in conn.execute(sa.select(plans.c.id).order_by(plans.c.id)).all():
        document, summary = conn.execute(
            sa.select(plans.c.document, plans.c.summary).where(plans.c.id == plan_id)
        ).one()
        values: dict[str, Any] = {}
        if _document(document, old, new, old_fat, new_fat):
            values["document"] = document
        if _rename(summary, old_fat, new_fat):
            values["summary"] = summary
        if values:
            conn.execute(sa.update(plans).where(plans.c.id == plan_id).values(**values))
    q = sa.select(jobs.c.id, jobs.c.result).where(jobs.c.kind.in_(("plan", "execute_plan")), jobs.c.result.is_not(None))
    for job_id, result in conn.execute(q).all():
        if isinstance(result, dict) and _rename(result.get("summary"), old_fat, new_fat):
            conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(result=result))


def upgrade() -> None:
    _rewrite(forward=True)


def downgrade() -> None:
    _rewrite(forward=False)
