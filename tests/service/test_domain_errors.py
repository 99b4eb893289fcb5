"""Services raise domain errors (no HTTP); `app.api.errors` maps each kind to one status code.

The service calls run in-process on a migrated SQLite file; the mapping is checked on a small
FastAPI app and, end to end with unchanged messages, on the running service.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from app.api import errors as api_errors
from app.core.config import Settings
from app.db.migrate import upgrade
from app.db.models import Chip, ChipAssignment, GroupRecord, PlanRecord
from app.db.session import make_engine
from app.schemas.plans import PlanIn
from app.services import chips as chipsvc
from app.services import plans as svc
from app.services.errors import Conflict, DomainError, Invalid, NotFound
from tests.rows import base_model_row


def test_services_import_nothing_of_http() -> None:
    code = (
        "import sys, app.services.plans, app.services.chips, app.services.jobs, app.services.keys, "
        "app.services.profiles, app.services.artifacts, app.services.errors; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fastapi', 'starlette') "
        "or m.startswith('app.api')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _raising_app() -> FastAPI:
    app = FastAPI()
    api_errors.install(app)
    raised: dict[str, Exception] = {
        "not-found": NotFound.of("plan", 7, ["path", "plan_id"]),
        "conflict": Conflict("chip 'c' has no model: unrecoverable", ["path", "chip_id"], status="unrecoverable"),
        "invalid": Invalid("unknown architecture 'vgg99'", ["body", "architecture"]),
        "fault-map": chipsvc.InvalidFaultMap([{"loc": ["body", "faults", 0, "bit"], "msg": "faults[0].bit: too big"}]),
    }

    @app.get("/{kind}")
    def _raise(kind: str) -> None:
        raise raised[kind]

    return app


@pytest.mark.parametrize(
    ("kind", "status", "body"),
    [
        ("not-found", 404, {"detail": "no plan 7", "errors": [{"loc": ["path", "plan_id"], "msg": "not found"}]}),
        (
            "conflict",
            409,
            {
                "detail": "chip 'c' has no model: unrecoverable",
                "errors": [{"loc": ["path", "chip_id"], "msg": "chip 'c' has no model: unrecoverable"}],
                "status": "unrecoverable",
            },
        ),
        (
            "invalid",
            422,
            {
                "detail": "unknown architecture 'vgg99'",
                "errors": [{"loc": ["body", "architecture"], "msg": "unknown architecture 'vgg99'"}],
            },
        ),
        (
            "fault-map",
            422,
            {
                "detail": "invalid fault map: faults[0].bit: too big",
                "errors": [{"loc": ["body", "faults", 0, "bit"], "msg": "faults[0].bit: too big"}],
            },
        ),
    ],
)
def test_each_domain_error_is_answered_with_its_status_code(kind: str, status: int, body: dict[str, Any]) -> None:
    with TestClient(_raising_app()) as c:
        r = c.get(f"/{kind}")
    assert r.status_code == status
    assert r.json() == body


def test_every_domain_error_kind_has_a_status_code() -> None:
    kinds = {NotFound, Conflict, Invalid, chipsvc.InvalidFaultMap}
    assert {api_errors.domain_status(k("x")) for k in (Conflict, Invalid)} == {409, 422}
    assert api_errors.domain_status(NotFound.of("x", 1, [])) == 404
    assert all(issubclass(k, DomainError) for k in kinds)


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    settings = Settings(var_dir=tmp_path / "var")
    upgrade(settings.database_url)
    return make_engine(settings)


def _plan_in(**kw: Any) -> PlanIn:
    return PlanIn.model_validate({"model": "m", "constraint": {"max_drop": 0.01}, **kw})


def test_model_and_plan_services_raise_domain_errors(engine: Engine) -> None:
    with Session(engine) as s:
        bm = base_model_row(s, status="pending", config={})
        with pytest.raises(NotFound) as nf:
            svc.get_model(s, "nope")
        assert nf.value.message == "no base model 'nope'" and nf.value.errors[0]["loc"] == ["path", "model"]
        with pytest.raises(NotFound, match="no accelerator profile 'nope'"):
            svc.check_new_model(s, "other", "nope")
        with pytest.raises(Conflict, match="a base model named 'm' already exists"):
            svc.check_new_model(s, "m", "sa8")
        with pytest.raises(Invalid, match="unknown architecture 'vgg99'"):
            svc.check_architecture("vgg99")
        with pytest.raises(Invalid, match="unknown dataset 'cifar'"):
            svc.check_dataset_name("cifar", uploaded=False)
        with pytest.raises(Conflict, match="is pending, not ready"):
            svc.new_plan(s, _plan_in(), bm)
        bm.status = "ready"
        with pytest.raises(Invalid, match="matches no chip") as inv:
            svc.new_plan(s, _plan_in(), bm)
        assert inv.value.errors[0]["loc"] == ["body", "chips"]
        with pytest.raises(Invalid, match="unknown chip id"):
            svc.new_plan(s, _plan_in(chips={"ids": ["c1"]}), bm)
        for get, key in ((svc.get_plan, 999), (svc.get_resilience_map, 999), (svc.get_group, 999)):
            with pytest.raises(NotFound, match="no .* 999"):
                get(s, key)


def test_download_services_raise_domain_errors(engine: Engine) -> None:
    with Session(engine) as s:
        bm = base_model_row(s, config={})
        plan = PlanRecord(base_model_id=bm.id, status="executed", constraint={})
        s.add(plan)
        s.flush()
        group = GroupRecord(plan_id=plan.id, index=0, status="training", fused_map={}, fused_digest="d", fused_rate=0.0)
        chip = Chip(
            chip_id="c1",
            accelerator_id=bm.accelerator_id,
            revision=1,
            fault_map={},
            content_hash="h",
            faults_digest="d",
            n_faults=0,
            fault_rate=0.0,
        )
        s.add_all([group, chip])
        s.flush()
        with pytest.raises(Conflict, match="has no trained model yet"):
            svc.group_artifact(group, "safetensors")
        with pytest.raises(NotFound, match="no chip 'c2'"):
            svc.chip_assignment(s, "c2", None)
        with pytest.raises(NotFound, match="in no executed plan yet"):
            svc.chip_assignment(s, "c1", None)
        s.add(ChipAssignment(chip_pk=chip.id, base_model_id=bm.id, plan_id=plan.id, status="unrecoverable"))
        s.flush()
        with pytest.raises(Conflict, match="has no model: unrecoverable") as cf:
            svc.chip_assignment(s, "c1", None)
        assert cf.value.extra == {"status": "unrecoverable"}


@pytest.mark.integration
def test_the_service_answers_domain_errors_as_before(service: Any, accelerator: str) -> None:
    with service.client() as c:
        r = c.get("/api/v1/plans/999999")
        assert r.status_code == 404
        assert r.json() == {"detail": "no plan 999999", "errors": [{"loc": ["path", "plan_id"], "msg": "not found"}]}
        r = c.get("/api/v1/chips/never-posted/model")
        assert r.status_code == 404 and r.json()["detail"] == "no chip 'never-posted'"
        r = c.post(
            "/api/v1/models",
            json={"name": "x", "architecture": "vgg99", "dataset": "digits", "accelerator": "a", "train": True},
        )
        assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "architecture"]
        r = c.post("/api/v1/chips", json={"chip_id": "bad-map", "accelerator": accelerator, "faults": [{"row": -1}]})
        assert r.status_code == 422 and r.json()["detail"].startswith("invalid fault map: ")
