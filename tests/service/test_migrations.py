"""The Alembic history creates exactly the SQLAlchemy models' schema, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

import app.db.models  # noqa: F401
from app.db.base import Base
from app.db.migrate import alembic_config, downgrade, upgrade


def _assert_matches_models(url: str) -> None:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": False})
            diff = compare_metadata(ctx, Base.metadata)
        assert diff == [], f"migrations and models differ: {diff}"
        tables = set(inspect(engine).get_table_names()) - {"alembic_version"}
        assert tables == set(Base.metadata.tables)
    finally:
        engine.dispose()


def _roundtrip(url: str) -> None:
    upgrade(url)
    _assert_matches_models(url)
    command.check(alembic_config(url))  # `alembic check`: no pending autogenerate operations
    downgrade(url, "base")
    engine = create_engine(url)
    try:
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()
    upgrade(url)
    _assert_matches_models(url)


def test_migrations_match_models_sqlite(tmp_path: Path) -> None:
    _roundtrip(f"sqlite:///{tmp_path / 'm.db'}")


@pytest.mark.integration
def test_migrations_match_models_postgres(pg_database: str) -> None:
    _roundtrip(pg_database)


def test_alembic_ini_at_repo_root_points_at_migrations() -> None:
    root = Path(__file__).resolve().parents[2]
    text = (root / "alembic.ini").read_text()
    assert "script_location = %(here)s/migrations" in text
    assert (root / "migrations" / "env.py").is_file()


def _pending_late_jobs_rekeyed(url: str) -> None:
    """0006 keeps the late-chip jobs queued before it (one per POST, all subject 'late-chips'):
    each pending one gets a subject of its own, so the new unique index fits them."""
    upgrade(url, "0005")
    engine = create_engine(url)
    try:
        cols = "(id, kind, state, progress, message, params, attempts, subject, created_at)"
        with engine.begin() as conn:
            for job_id, state, attempts in (("a" * 32, "queued", 0), ("b" * 32, "queued", 0), ("c" * 32, "running", 1)):
                conn.exec_driver_sql(
                    f"INSERT INTO jobs {cols} VALUES ('{job_id}', 'assign_chip', '{state}', 0, '', "
                    f"'{{\"chip_pks\": [1]}}', {attempts}, 'late-chips', CURRENT_TIMESTAMP)"
                )
        upgrade(url)
        with engine.connect() as conn:
            subjects = dict(conn.exec_driver_sql("SELECT id, subject FROM jobs").all())
        assert subjects == {
            "a" * 32: "late-chips:job:" + "a" * 32,
            "b" * 32: "late-chips:job:" + "b" * 32,
            "c" * 32: "late-chips",
        }
        downgrade(url, "0005")
    finally:
        engine.dispose()


def test_0006_rekeys_pending_late_jobs_sqlite(tmp_path: Path) -> None:
    _pending_late_jobs_rekeyed(f"sqlite:///{tmp_path / 'm.db'}")


@pytest.mark.integration
def test_0006_rekeys_pending_late_jobs_postgres(pg_database: str) -> None:
    _pending_late_jobs_rekeyed(pg_database)
