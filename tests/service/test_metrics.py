"""`/metrics`' fleet figures read from the rows (`app.api.metrics.train_passes`), on a migrated
SQLite file and on a fresh PostgreSQL database: JSON paths read differently on each."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from app.api import metrics
from app.core.config import Settings
from app.db.migrate import upgrade
from app.db.models import Artifact, GroupRecord, ModelRecord, PlanRecord, ResilienceMapRecord
from app.db.session import make_engine
from tests.rows import base_model_row


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        settings = Settings(var_dir=tmp_path / "var")
    else:
        settings = Settings(var_dir=tmp_path / "var", database_url=request.getfixturevalue("pg_database"))
    upgrade(settings.database_url)
    eng = make_engine(settings)
    yield eng
    eng.dispose()


def _plan(s: Session, bm: ModelRecord, params: dict[str, object], groups: list[tuple[int, bool]]) -> None:
    """A plan with `params` and one group per (epochs, trained: has a model artifact)."""
    plan = PlanRecord(base_model_id=bm.id, status="executed", constraint={}, params=params)
    s.add(plan)
    s.flush()
    for i, (epochs, trained) in enumerate(groups):
        art = None
        if trained:
            art = Artifact(
                sha256=f"{plan.id:02d}{i:02d}".ljust(64, "0"), kind="model", size=1, media_type="x", location="db:"
            )
            s.add(art)
            s.flush()
        s.add(
            GroupRecord(
                plan_id=plan.id,
                index=i,
                status="verified" if trained else "pending",
                fused_map={},
                fused_digest="d",
                fused_rate=0.0,
                epochs=epochs,
                model_artifact_id=art.id if art else None,
            )
        )


def _map(s: Session, bm: ModelRecord, key: str, training_epochs: int, train: dict[str, object]) -> None:
    s.add(
        ResilienceMapRecord(
            key=key,
            base_model_id=bm.id,
            accelerator_id=bm.accelerator_id,
            status="ready",
            document={"rates": [0.1], "epochs": [0, 1], "meta": {"train": train}},
            training_epochs=training_epochs,
        )
    )


def test_epochs_trained_counts_full_passes_over_the_train_split(engine: Engine) -> None:
    with Session(engine) as s:
        bm = base_model_row(s)
        half = {"train": {"lr": 0.01, "batch_size": 64, "seed": 0, "epoch_fraction": 0.5}}
        _plan(s, bm, half, [(2, True), (4, True), (8, False)])  # 6 retraining epochs of half a pass
        _plan(s, bm, {"train": {"lr": 0.01, "epoch_fraction": 1.0}}, [(3, True)])
        _plan(s, bm, {}, [(1, True)])  # a plan stored before train.epoch_fraction: whole passes
        _map(s, bm, "a" * 64, 10, {"lr": 0.01, "epoch_fraction": 0.25})
        _map(s, bm, "b" * 64, 4, {"lr": 0.01})  # whole-epoch maps leave the key out
        s.commit()

        assert metrics.train_passes(s) == {"group_retraining": 3.0 + 3.0 + 1.0, "resilience_map": 2.5 + 4.0}


def test_the_scrape_shows_those_passes(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    with Session(engine) as s:
        bm = base_model_row(s)
        _plan(s, bm, {"train": {"epoch_fraction": 0.5}}, [(3, True)])
        s.commit()
    from sqlalchemy.orm import sessionmaker

    monkeypatch.setattr("app.db.session.get_sessionmaker", lambda: sessionmaker(engine))
    registry = CollectorRegistry()
    registry.register(metrics.FleetCollector())
    text = generate_latest(registry).decode()
    samples = {
        (x.name, tuple(sorted(x.labels.items()))): x.value
        for fam in text_string_to_metric_families(text)
        for x in fam.samples
    }
    assert samples[("faultfleet_epochs_trained_total", (("purpose", "group_retraining"),))] == 1.5
    assert "Full passes over the train split" in text
