"""The fleet jobs' store: stored settings parsed once through the API's schemas, and the model
library loaded only as far as a job needs it (SQLite, local artifacts: no service)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.db.base import Base
from app.db.models import LibraryModelRecord, ModelRecord
from app.schemas.plans import ModelConfig, ModelIn, PlanIn, PlanParams

pytest.importorskip("torch")
import accelerator as acc  # noqa: E402
from accelerator import ArrayConfig  # noqa: E402
from app.services import artifacts  # noqa: E402
from workers import pipeline, store  # noqa: E402
from workers.export import state_dict_bytes  # noqa: E402

SHAPE, CLASSES = (1, 8, 8), 10


def test_a_plans_stored_params_are_parsed_once_with_the_apis_defaults() -> None:
    body = PlanIn.model_validate(
        {
            "model": "m",
            "constraint": {"max_drop": 0.02},
            "resilience": {"rates": [0.1, 0.02], "epochs": [4, 1], "samples": 3},
            "train": {"lr": 0.02},
            "max_group_size": 7,
        }
    )
    stored = json.loads(json.dumps(body.params()))  # as the row's JSON column gives it back
    assert set(stored) == set(PlanParams.model_fields)
    params = PlanParams.stored(stored)
    settings = store.plan_settings(params)
    assert (settings.ladder, settings.map_rates, settings.map_samples) == ((0, 1, 4), (0.02, 0.1), 3)
    assert (settings.max_group_size, settings.bypass, settings.robust_base, settings.schedule) == (
        7,
        True,
        "auto",
        "progressive_union",
    )
    assert settings.map_cells == "adaptive" == params.map_cells  # the API's default reaches the loop
    assert store.plan_settings(PlanParams.stored({**stored, "map_cells": "full"})).map_cells == "full"
    assert settings.climb == "bounded" == params.climb == pipeline.FleetSettings().climb
    assert store.plan_settings(PlanParams.stored({**stored, "climb": "full"})).climb == "full"
    cfg = store.train_config(params, "cpu")
    assert (cfg.lr, cfg.batch_size, cfg.seed, cfg.device) == (0.02, 64, 0, "cpu")
    assert store.train_config(params.train) == pipeline.TrainConfig(lr=0.02)
    # a row without params gets the API's defaults, not a second copy of them
    assert (
        PlanParams.stored(None)
        == PlanParams()
        == PlanParams.stored(PlanIn(model="m", constraint={"max_drop": 0.1}).params())
    )
    # a grid of epoch 0 alone climbs the fleet loop's default ladder
    only_zero = PlanParams.stored({"resilience": {"epochs": [0]}})
    assert store.plan_settings(only_zero).ladder == pipeline.FleetSettings().ladder
    with pytest.raises(ValidationError):
        PlanParams.stored({"max_group_size": 0})


def test_a_models_stored_config_has_the_registration_defaults() -> None:
    cfg = ModelConfig.stored({"seed": 3, "uploaded_weights_sha256": "ab" * 32})
    assert (cfg.seed, cfg.epochs, cfg.lr, cfg.batch_size, cfg.weights_suffix, cfg.dataset_sha256) == (
        3,
        10,
        0.05,
        64,
        ".safetensors",
        None,
    )
    defaults = ModelIn(name="m", architecture="mlp", dataset="digits", accelerator="a")
    assert ModelConfig.stored(None).model_dump(include={"epochs", "lr", "batch_size", "seed"}) == defaults.model_dump(
        include={"epochs", "lr", "batch_size", "seed"}
    )


def test_the_library_gets_its_base_once_and_a_retraining_job_loads_only_its_group_base(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(artifacts, "get_settings", lambda: Settings(var_dir=tmp_path))
    engine = create_engine(f"sqlite:///{tmp_path / 'lib.db'}")
    Base.metadata.create_all(engine)  # SQLite does not enforce the foreign keys here: no profile needed
    base = acc.build_model("mlp", SHAPE, CLASSES, seed=0)
    robust = acc.build_model("mlp", SHAPE, CLASSES, seed=1)
    with Session(engine, expire_on_commit=False) as s:
        w = artifacts.store_bytes(s, state_dict_bytes(base.state_dict()), "model", store.SAFETENSORS)
        r = artifacts.store_bytes(s, state_dict_bytes(robust.state_dict()), "model", store.SAFETENSORS)
        bm = ModelRecord(
            name="m", architecture="mlp", dataset="digits", accelerator_id=1, status="ready", weights_artifact_id=w.id
        )
        s.add(bm)
        s.commit()
    info = store.ModelInfo(bm.id, "m", "mlp", "digits", ModelConfig(), ArrayConfig(8, 8), w.sha256, 0.9, 1)
    loaded = store.LoadedBaseModel(info, base, SimpleNamespace(input_shape=SHAPE, num_classes=CLASSES))
    store.add_to_library(engine, bm.id, "robust", "robust", r.id, training_epochs=3)

    loaded_weights: list[str] = []
    real = store.load_group_model
    monkeypatch.setattr(store, "load_group_model", lambda d, sha: loaded_weights.append(sha) or real(d, sha))
    for _ in range(2):
        lib, ids = store.load_library(engine, loaded)
        assert [lm.key for lm in lib] == ["base", "robust"] and set(ids) == {"base", "robust"}
        assert lib[0].model is base
    with Session(engine) as s:
        assert s.scalar(select(func.count()).where(LibraryModelRecord.key == "base")) == 1
    assert loaded_weights == [r.sha256, r.sha256]  # screening loads the whole library

    loaded_weights.clear()
    group_base = store.library_model(engine, loaded, "robust")
    assert loaded_weights == [r.sha256]  # retraining loads its group base alone
    assert all(
        (a == b).all() for a, b in zip(group_base.state_dict().values(), robust.state_dict().values(), strict=True)
    )
    assert store.library_model(engine, loaded, "base") is base
    assert store.library_model(engine, loaded, "plan9:g0") is base and loaded_weights == [r.sha256]
    engine.dispose()
