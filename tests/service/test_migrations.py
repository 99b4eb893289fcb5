"""The Alembic history creates exactly the SQLAlchemy models' schema, on SQLite and PostgreSQL."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import MetaData, Table, create_engine, func, inspect, select

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


def _small_plan_doc() -> dict[str, Any]:
    """A real plan document, replanned once (so its chips have a history): what the planner stores now."""
    from accelerator.faults import ArrayConfig
    from planner import AccuracyConstraint, ResilienceMap, plan_fleet, replan
    from planner.synthetic_fleet import sample_fault_map

    array, rng = ArrayConfig(8, 8), np.random.default_rng(0)
    maps = [replace(sample_fault_map(array, 0.05, rng), chip_id=f"c{i}") for i in range(4)]
    rmap = ResilienceMap.ladder([0, 1, 2, 4], 0.95)
    plan = plan_fleet(maps, {m.chip_id: 0.5 for m in maps}, rmap, AccuracyConstraint.relative(0.01))
    plan = replan(plan, {c: 0.1 for g in plan.pending_groups for c in g.members})
    return json.loads(plan.to_json())


def _as_before_0008(doc: dict[str, Any]) -> dict[str, Any]:
    """`doc` with the names the planner stored before revision 0008."""
    old = copy.deepcopy(doc)
    old["per_chip_fat_amount"] = old.pop("per_chip_fat_epochs_each")
    old["summary"]["per_chip_fat_amount"] = old["summary"].pop("per_chip_fat_epochs_each")
    for g in old["groups"]:
        g["amount"] = g.pop("epochs")
    for st in old["chips"]:
        st["amount"] = st.pop("epochs")
        for h in st["history"]:
            h["amount"] = h.pop("epochs")
    return old


def _plan_documents_renamed(url: str) -> None:
    """0008 renames `amount` to `epochs` (and `per_chip_fat_amount` to `per_chip_fat_epochs_each`)
    in stored plan documents, summaries and plan job results; its downgrade renames back."""
    from planner import Plan

    new = _small_plan_doc()
    old = _as_before_0008(new)
    assert any(st["history"] for st in old["chips"])
    upgrade(url, "0007")
    engine = create_engine(url)
    meta = MetaData()
    plans = Table("plans", meta, autoload_with=engine)
    jobs = Table("jobs", meta, autoload_with=engine)
    old_summary = {"per_chip_fat_amount": 4, "per_chip_fat_epochs": 16, "ledger": {"x": 1}}
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO accelerator_profiles (id, name, rows, cols, fmt, bypass, created_at) "
                "VALUES (1, 'a', 8, 8, 'int8', false, CURRENT_TIMESTAMP)"
            )
            conn.exec_driver_sql(
                "INSERT INTO base_models (id, name, architecture, dataset, accelerator_id, status, config, created_at) "
                "VALUES (1, 'm', 'mlp', 'digits', 1, 'ready', '{}', CURRENT_TIMESTAMP)"
            )
            now = func.current_timestamp()
            conn.execute(
                plans.insert().values(
                    id=1, base_model_id=1, status="executed", constraint={}, selection={}, params={},
                    summary=old_summary, document=old, created_at=now, updated_at=now,
                )
            )  # fmt: skip
            for job_id, kind in (("p" * 32, "plan"), ("c" * 32, "resilience_cell")):
                conn.execute(
                    jobs.insert().values(
                        id=job_id, kind=kind, state="succeeded", progress=1.0, message="", params={}, attempts=1,
                        result={"plan_id": 1, "summary": dict(old_summary)}, created_at=now,
                    )
                )  # fmt: skip

        def stored() -> tuple[Any, Any, dict[str, Any]]:
            with engine.connect() as conn:
                doc, summary = conn.execute(select(plans.c.document, plans.c.summary)).one()
                results = dict(conn.execute(select(jobs.c.id, jobs.c.result)).all())
            return doc, summary, results

        upgrade(url)
        doc, summary, results = stored()
        assert doc == new
        assert Plan.from_dict(doc).to_dict() == new
        assert summary == {"per_chip_fat_epochs_each": 4, "per_chip_fat_epochs": 16, "ledger": {"x": 1}}
        assert results["p" * 32]["summary"] == summary
        assert results["c" * 32]["summary"] == old_summary  # not a plan job: left alone
        downgrade(url, "0007")
        doc, summary, results = stored()
        assert doc == old and summary == old_summary and results["p" * 32]["summary"] == old_summary
    finally:
        engine.dispose()


def test_0008_renames_amount_to_epochs_in_plan_documents_sqlite(tmp_path: Path) -> None:
    _plan_documents_renamed(f"sqlite:///{tmp_path / 'm.db'}")


@pytest.mark.integration
def test_0008_renames_amount_to_epochs_in_plan_documents_postgres(pg_database: str) -> None:
    _plan_documents_renamed(pg_database)
