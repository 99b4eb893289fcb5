"""jobs record the process that runs them; worker heartbeats

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05 03:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("worker_host", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("worker_pid", sa.Integer(), nullable=True))
    op.create_table(
        "worker_heartbeats",
        sa.Column("id", sa.String(length=255), nullable=False),
        sa.Column("nodename", sa.String(length=255), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("worker_heartbeats", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_worker_heartbeats_heartbeat_at"), ["heartbeat_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("worker_heartbeats", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_worker_heartbeats_heartbeat_at"))
    op.drop_table("worker_heartbeats")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("worker_pid")
        batch_op.drop_column("worker_host")
