"""at most one pending late-chip job per accelerator: a partial unique index on jobs.subject

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 07:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PENDING = "kind = 'assign_chip' AND state = 'queued' AND attempts = 0"


def upgrade() -> None:
    # Pending late-chip jobs made before this revision all have the subject 'late-chips' (one per
    # POST): each gets a subject of its own, so they stay as they are and fit the index.
    op.execute(
        sa.text(f"UPDATE jobs SET subject = 'late-chips:job:' || id WHERE subject = 'late-chips' AND {PENDING}")
    )
    op.create_index(
        "uq_jobs_pending_late_chips",
        "jobs",
        ["subject"],
        unique=True,
        postgresql_where=sa.text(PENDING),
        sqlite_where=sa.text(PENDING),
    )


def downgrade() -> None:
    op.drop_index("uq_jobs_pending_late_chips", table_name="jobs")
