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
