"""model library: verified models later chips may run; what each chip runs and its test accuracy;
why a model, plan or resilience map failed

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05 03:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "library_models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("base_model_id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("artifact_id", sa.Integer(), nullable=False),
        sa.Column("group_id", sa.Integer(), nullable=True),
        sa.Column("fused_map", sa.JSON(), nullable=True),
        sa.Column("protect_layer", sa.String(length=128), nullable=True),
        sa.Column("training_epochs", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["base_model_id"], ["base_models.id"], name=op.f("fk_library_models_base_model_id_base_models"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(["artifact_id"], ["artifacts.id"], name=op.f("fk_library_models_artifact_id_artifacts")),
        sa.ForeignKeyConstraint(
            ["group_id"], ["plan_groups.id"], name=op.f("fk_library_models_group_id_plan_groups"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_library_models")),
        sa.UniqueConstraint("base_model_id", "key", name=op.f("uq_library_models_base_model_id_key")),
    )
    op.create_index(op.f("ix_library_models_base_model_id"), "library_models", ["base_model_id"])
    for table in ("base_models", "plans", "resilience_maps"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("error", sa.Text(), nullable=True))
    with op.batch_alter_table("chip_assignments") as batch:
        batch.add_column(sa.Column("library_model_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("test_accuracy", sa.Float(), nullable=True))
        batch.create_foreign_key(
            op.f("fk_chip_assignments_library_model_id_library_models"), "library_models", ["library_model_id"], ["id"]
        )
        batch.create_index(op.f("ix_chip_assignments_library_model_id"), ["library_model_id"])


def downgrade() -> None:
    for table in ("base_models", "plans", "resilience_maps"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("error")
    with op.batch_alter_table("chip_assignments") as batch:
        batch.drop_index(op.f("ix_chip_assignments_library_model_id"))
        batch.drop_constraint(op.f("fk_chip_assignments_library_model_id_library_models"), type_="foreignkey")
        batch.drop_column("test_accuracy")
        batch.drop_column("library_model_id")
    op.drop_index(op.f("ix_library_models_base_model_id"), table_name="library_models")
    op.drop_table("library_models")
