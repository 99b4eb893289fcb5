"""The whole fleet loop through HTTP: a real uvicorn, a real Celery worker, PostgreSQL + Redis and
the embedded default. Small on purpose (digits, an 8x8 array, a dozen chips) so it runs in minutes.
"""

from __future__ import annotations

import hashlib
import json
import time
import unicodedata
import uuid
from typing import Any
from urllib.parse import quote

import pytest
import sqlalchemy as sa
from safetensors.torch import load as load_safetensors

import accelerator as acc
from accelerator import ArrayConfig, FaultMap, bypass_faulty_pes, bypass_pes
from planner import FleetSpec, generate_fleet

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROWS = COLS = 8
TERMINAL_CHIP_STATES = {"verified", "needs_nothing", "unrecoverable"}


def _fleet(accel: str, n: int, seed: int, defects: float = 2.5) -> list[dict[str, Any]]:
    spec = FleetSpec(array=ArrayConfig(ROWS, COLS), accelerator=accel, defects_per_die=defects, cluster_mean_pes=2.0)
    maps = [m.to_dict() for m in generate_fleet(n, seed, spec)]
    for m in maps:  # chip ids unique across tests that share a database
        m["chip_id"] = f"{accel}-{m['chip_id']}"
    return maps


def _ok(r: Any, *codes: int) -> dict[str, Any]:
    assert r.status_code in (codes or (200,)), f"{r.request.method} {r.request.url}: {r.status_code} {r.text}"
    return dict(r.json())


def _post_profile(c: Any, accel: str, maps: list[dict[str, Any]]) -> dict[str, Any]:
    """The ROWS x COLS int8 bypass profile `accel`, then `maps` on it in one bulk (its answer)."""
    _ok(
        c.post("/api/v1/accelerators", json={"name": accel, "rows": ROWS, "cols": COLS, "fmt": "int8", "bypass": True}),
        201,
    )
    if not maps:
        return {}
    body = "".join(json.dumps(m) + "\n" for m in maps)
    return _ok(c.post("/api/v1/chips/bulk", content=body, headers={"Content-Type": "application/x-ndjson"}))


def _setup_fleet(service: Any, *, n_chips: int, seed: int, arch: str, grid: dict[str, Any]) -> dict[str, Any]:
    """Profile, chips (bulk NDJSON), a trained base model; returns names and the posted maps."""
    tag = uuid.uuid4().hex[:6]
    accel = f"e2e-{tag}"
    maps = _fleet(accel, n_chips, seed)
    with service.client() as c:
        bulk = _post_profile(c, accel, maps)
        assert bulk["created"] == n_chips, bulk
        model = f"m-{tag}"
        reg = _ok(
            c.post(
                "/api/v1/models",
                json={
                    "name": model,
                    "architecture": arch,
                    "dataset": "digits",
                    "accelerator": accel,
                    "train": True,
                    "epochs": 12,
                },
            ),
            202,
        )
    job = service.wait_job(reg["job"]["id"], timeout=300)
    assert job["state"] == "succeeded", job
    return {"accel": accel, "model": model, "maps": maps, "grid": grid}


def _plan(service: Any, fleet: dict[str, Any], **extra: Any) -> int:
    with service.client() as c:
        body = {
            "model": fleet["model"],
            "constraint": {"max_drop": 0.03},
            "chips": {"ids": [m["chip_id"] for m in fleet["maps"]]},
            "max_group_size": 4,
            "resilience": fleet["grid"],
            "resilience_map": "on",  # these tests read the measured map; "auto" skips it on a dozen chips
            **extra,
        }
        acc_ = _ok(c.post("/api/v1/plans", json=body), 202)
    job = service.wait_job(acc_["job"]["id"], timeout=600)
    assert job["state"] == "succeeded", job.get("error")
    return int(acc_["plan"]["id"])


def _execute(service: Any, plan_id: int, timeout: float = 900) -> dict[str, Any]:
    with service.client() as c:
        job = _ok(c.post(f"/api/v1/plans/{plan_id}/execute"), 202)
    done = service.wait_job(job["id"], timeout=timeout)
    assert done["state"] == "succeeded", done.get("error")
    with service.client() as c:
        return _ok(c.get(f"/api/v1/plans/{plan_id}"))


def _download(service: Any, path: str, **params: str) -> tuple[bytes, Any]:
    with service.client() as c, c.stream("GET", path, params=params) as r:
        assert r.status_code == 200, r.read()
        data = b"".join(r.iter_bytes())
        return data, r.headers


def test_fleet_plan_execute_verify_download(pg_service: Any) -> None:
    """The whole fleet end to end, once, on PostgreSQL + Redis (the stricter SQL). The embedded
    default runs the same paths elsewhere: plan, execution and group downloads in
    test_the_service_and_the_bench_run_one_loop, the library listing in
    test_the_service_grows_the_robust_base_as_the_loop_does, map cells and plan, group and chip
    downloads in tests/tools/test_cli_fleet.py, late chips in test_late_chip_coalescing.py;
    a second whole run on it checked no path those do not."""
    service = pg_service
    grid = {"rates": [0.05, 0.1, 0.2], "epochs": [0, 1, 3], "samples": 1}
    fleet = _setup_fleet(service, n_chips=12, seed=3, arch="mlp", grid=grid)
    plan_id = _plan(service, fleet, map_cells="full")  # the full grid: fanned out per cell, cached per model
    with service.client() as c:
        planned = _ok(c.get(f"/api/v1/plans/{plan_id}"))
        rmap = _ok(c.get(f"/api/v1/resilience-maps/{planned['resilience_map_id']}"))
        png = c.get(f"/api/v1/resilience-maps/{planned['resilience_map_id']}/plot.png", params={"max_drop": 0.03})
    assert planned["status"] == "planned" and planned["summary"]["chips"] == 12
    assert planned["summary"]["predicted_epochs"] <= planned["summary"]["per_chip_fat_epochs"]
    assert rmap["status"] == "ready" and len(rmap["map"]["rates"]) == 3
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"

    # a second plan of the same model and grid reuses the cached map: no new cell jobs
    with service.client() as c:
        second = _ok(
            c.post(
                "/api/v1/plans",
                json={
                    "model": fleet["model"],
                    "constraint": {"max_drop": 0.05},
                    "chips": {"ids": [fleet["maps"][0]["chip_id"]]},
                    "resilience": grid,
                    "resilience_map": "on",
                    "map_cells": "adaptive",  # a ready full map of the same grid serves an adaptive request
                },
            ),
            202,
        )
    job = service.wait_job(second["job"]["id"], timeout=300)
    assert job["state"] == "succeeded", job
    with service.client() as c:
        assert _ok(c.get(f"/api/v1/plans/{second['plan']['id']}"))["resilience_map_id"] == planned["resilience_map_id"]
    engine = sa.create_engine(service.database_url)
    with engine.connect() as conn:
        cells = conn.execute(
            sa.text("SELECT count(*) FROM jobs WHERE kind = 'resilience_cell' AND parent_id = :p"),
            {"p": second["job"]["id"]},
        ).scalar_one()
    engine.dispose()
    assert cells == 0

    plan = _execute(service, plan_id)
    assert plan["status"] == "executed"
    states = {ch["chip_id"]: ch for ch in plan["chips"]}
    assert set(states) == {m["chip_id"] for m in fleet["maps"]}
    assert all(ch["status"] in TERMINAL_CHIP_STATES for ch in states.values()), states
    for ch in states.values():
        if ch["status"] == "unrecoverable":
            assert ch["reason"] and "protected" in ch["reason"]
    trained = [g for g in plan["groups"] if g["model_sha256"]]
    assert trained, "the fleet was built so that some chips fail screening and need retraining"

    array = ArrayConfig(ROWS, COLS)
    validation, test = acc.load_dataset("digits").validation_test()  # decisions / verification
    assert plan["summary"]["bypassed_chips"] == sum(1 for ch in states.values() if ch["bypass"]) > 0
    own = {m["chip_id"]: FaultMap.from_dict(m, array=array) for m in fleet["maps"]}
    # a chip the plan deploys with PEs bypassed computes on its bypassed map
    maps = {c: bypass_faulty_pes(m, states[c]["bypass"]) if states[c]["bypass"] else m for c, m in own.items()}
    for c, m in maps.items():
        extra = {(f.row, f.col) for f in m.faults if f.site == "pe"} - {
            (f.row, f.col) for f in own[c].faults if f.site == "pe"
        }
        assert sorted(extra) == sorted(tuple(pe) for pe in states[c]["bypassed"])
    group_manifests: dict[str, dict[str, Any]] = {}
    for g in trained:
        blob, headers = _download(service, f"/api/v1/groups/{g['id']}/model")
        sha = hashlib.sha256(blob).hexdigest()
        assert headers["etag"].strip('"') == sha == g["model_sha256"]
        assert int(headers["content-length"]) == len(blob)
        manifest_raw, _ = _download(service, f"/api/v1/groups/{g['id']}/model", format="manifest")
        manifest = json.loads(manifest_raw)
        assert manifest["model"]["sha256"] == sha
        assert sorted(manifest["members"]) == sorted(m["chip_id"] for m in g["members"])
        assert manifest["fused_map_digest"] == g["fused_digest"]
        model = acc.load_model("mlp", load_safetensors(blob), test.input_shape, test.num_classes)
        protect = tuple(manifest["protect"])
        for chip_id, stated in manifest["accuracy"].items():
            # the downloaded file reproduces the accuracy its manifest states, on the chip's own map
            # with the PEs the manifest says to bypass (its policy's and its group's) bypassed
            pes = [tuple(pe) for pe in (manifest["bypass"].get(chip_id) or {"pes": []})["pes"]]
            assert set(maps[chip_id].dead_pes - own[chip_id].dead_pes) <= set(pes)
            on_chip = bypass_pes(own[chip_id], pes)
            # (stated on the test split, which no decision saw; the plan decided on the validation split)
            assert acc.evaluate(model, array, on_chip, test, protect=protect) == pytest.approx(stated, abs=1e-12)
            assert acc.evaluate(model, array, on_chip, validation, protect=protect) == pytest.approx(
                manifest["validation_accuracy"][chip_id], abs=1e-12
            )
        group_manifests[g["key"]] = manifest
        delta, _ = _download(service, f"/api/v1/groups/{g['id']}/model", format="delta")
        assert len(delta) > 0

    with service.client() as c:
        for chip_id, ch in states.items():
            r = c.get(f"/api/v1/chips/{chip_id}/model", params={"format": "manifest"})
            if ch["status"] == "unrecoverable":
                assert r.status_code == 409 and "unrecoverable" in r.json()["detail"]
                continue
            assert r.status_code == 200, r.text
            man = r.json()
            assert man["chip_id"] == chip_id and man["status"] == ch["status"]
            stated_bypass = man["bypass"] or {"policy": None, "pes": []}
            if ch["status"] == "verified":
                group = next(g for g in plan["groups"] if g["key"] == ch["group_id"])
                assert man["model"]["sha256"] == group["model_sha256"]
                # the chip's manifest and its group's agree on what the chip bypasses
                assert man["bypass"] == group_manifests[group["key"]]["bypass"].get(chip_id)
                assert stated_bypass["policy"] == ch["bypass"]
                assert {tuple(pe) for pe in ch["bypassed"]} <= {tuple(pe) for pe in stated_bypass["pes"]}
            else:
                assert stated_bypass == {"policy": ch["bypass"], "pes": ch["bypassed"]}
                assert man["kind"] == "base_model"
        # a second execute is the same execution, not a new one
        again = _ok(c.post(f"/api/v1/plans/{plan_id}/execute"), 202)
        assert again["state"] == "succeeded"

    # The library: the base and every group model that serves a verified member, with the chips each serves.
    with service.client() as c:
        library = _ok(c.get(f"/api/v1/models/{fleet['model']}/library"))
    kinds = {m["key"]: m for m in library["models"]}
    assert kinds["base"]["kind"] == "base"
    assert kinds["base"]["chips_served"] == sum(1 for ch in states.values() if ch["status"] == "needs_nothing")
    verified_groups = {ch["group_id"] for ch in states.values() if ch["status"] == "verified"}
    assert {f"plan{plan_id}:{k}" for k in verified_groups} <= set(kinds)
    assert library["chips_served"] == sum(m["chips_served"] for m in library["models"])

    # A chip that arrives after the plan ran is screened against the library. It carries the
    # fault map of a chip that failed screening and was verified in a group, so the base fails
    # again and some group model (at the latest its twin's) must meet the constraint.
    twin = next(ch for ch in states.values() if ch["status"] == "verified")
    late = dict(next(m for m in fleet["maps"] if m["chip_id"] == twin["chip_id"]))
    # Its id has a quote, characters outside Latin-1 and an NFD accent (stored as NFC): the
    # download names it in RFC 5987 form, with an ASCII fallback.
    late["chip_id"] = f'{fleet["accel"]}-late "芯片" e\u0301'
    nfc = unicodedata.normalize("NFC", late["chip_id"])
    with service.client() as c:
        ingested = _ok(c.post("/api/v1/chips", json=late), 201)
        assert "assignment_job" in ingested and ingested["chip_id"] == nfc
        job = service.wait_job(ingested["assignment_job"], timeout=300)
        assert job["state"] == "succeeded", job
        r = c.get(f"/api/v1/chips/{quote(late['chip_id'])}/model", params={"format": "manifest"})
        weights = c.get(f"/api/v1/chips/{quote(nfc)}/model")
        after = _ok(c.get(f"/api/v1/models/{fleet['model']}/library"))
    assert weights.status_code == 200 and len(weights.content) > 0, weights.text
    disposition = weights.headers["content-disposition"]
    fallback = f"{fleet['accel']}-late______e-model.safetensors"
    assert disposition.startswith(f'attachment; filename="{fallback}"; '), disposition
    assert disposition.endswith("filename*=UTF-8''" + quote(f"{nfc}-model.safetensors", safe="")), disposition
    man = _ok(r)
    assert man["chip_id"] == nfc
    assert man["source"] == "late" and man["status"] == "verified" and man["kind"] == "group_model"
    assert man["library_model"] in {f"plan{plan_id}:{k}" for k in verified_groups}
    assert man["validation_accuracy"] >= plan["summary"]["thresholds"]["validation"] - 1e-12
    assert after["chips_served"] == library["chips_served"] + 1
    # the file it downloads is what it was screened with: its group model, its own map, its bypass
    blob = weights.content
    model = acc.load_model("mlp", load_safetensors(blob), test.input_shape, test.num_classes)
    pes = [tuple(pe) for pe in (man["bypass"] or {"pes": []})["pes"]]
    on_chip = bypass_pes(FaultMap.from_dict(late, array=array), pes)
    protect = tuple(man["group"]["protect"]) if man["group"] else ()
    assert acc.evaluate(model, array, on_chip, test, protect=protect) == pytest.approx(man["accuracy"], abs=1e-12)


def test_bad_plan_and_model_requests_are_rejected(service: Any) -> None:
    with service.client() as c:
        r = c.post("/api/v1/plans", json={"model": "x", "constraint": {"max_drop": 0.01}, "map_cells": "sparse"})
        assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "map_cells"], r.text
        assert "'adaptive' or 'full'" in r.json()["errors"][0]["msg"], r.text
        r = c.post("/api/v1/plans", json={"model": "x", "constraint": {"max_drop": 0.01}, "climb": "sometimes"})
        assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "climb"], r.text
        r = c.post("/api/v1/plans", json={"model": "no-such-model", "constraint": {"max_drop": 0.01}})
        assert r.status_code == 404 and "no-such-model" in r.json()["detail"]
        r = c.post("/api/v1/plans", json={"model": "x", "constraint": {"max_drop": 0.01, "min_accuracy": 0.9}})
        assert r.status_code == 422 and "exactly one" in r.text
        r = c.post(
            "/api/v1/models",
            json={"name": "bad", "architecture": "vgg99", "dataset": "digits", "accelerator": "a", "train": True},
        )
        assert r.status_code == 422 and "vgg99" in r.json()["detail"]
        r = c.post(
            "/api/v1/models",
            files={"weights": ("w.safetensors", b"not a safetensors file")},
            data={
                "name": f"bad-{uuid.uuid4().hex[:6]}",
                "architecture": "mlp",
                "dataset": "digits",
                "accelerator": "nope",
            },
        )
        assert r.status_code == 422 and "weights" in r.json()["detail"]
        r = c.get("/api/v1/groups/999999/model")
        assert r.status_code == 404
        r = c.get("/api/v1/chips/never-posted/model")
        assert r.status_code == 404


def test_worker_killed_during_group_retraining_resumes_from_checkpoint(pg_service: Any) -> None:
    """SIGKILL the worker while a group retrains; a new worker finishes from the last epoch checkpoint."""
    service = pg_service
    grid = {"rates": [0.1, 0.2], "epochs": [0, 6], "samples": 1}
    fleet = _setup_fleet(service, n_chips=6, seed=11, arch="lenet5", grid=grid)
    plan_id = _plan(service, fleet, constraint={"max_drop": 0.005})
    with service.client() as c:
        job = _ok(c.post(f"/api/v1/plans/{plan_id}/execute"), 202)
    engine = sa.create_engine(service.database_url)
    deadline = time.monotonic() + 300
    while True:  # wait until some group has finished at least one epoch (its checkpoint exists)
        with engine.connect() as conn:
            row = conn.execute(
                sa.text("SELECT id, checkpoint FROM jobs WHERE kind = 'retrain_group' AND state = 'running'")
            ).first()
        checkpoint = row.checkpoint if row is not None else None
        if isinstance(checkpoint, str):
            checkpoint = json.loads(checkpoint)
        if checkpoint and checkpoint.get("epochs_done", 0) >= 1:
            break
        assert time.monotonic() < deadline, "no group retraining reached its first epoch"
        time.sleep(0.2)
    service.kill_worker()
    service.start_worker()
    done = service.wait_job(job["id"], timeout=900)
    assert done["state"] == "succeeded", done
    with engine.connect() as conn:
        result = conn.execute(sa.text("SELECT result FROM jobs WHERE id = :i"), {"i": row.id}).scalar_one()
        resumed = (json.loads(result) if isinstance(result, str) else result)["resumed_from_epoch"]
        dup = conn.execute(sa.text("SELECT count(*) - count(DISTINCT sha256) FROM artifacts")).scalar_one()
        members = conn.execute(
            sa.text(
                "SELECT count(*) FROM group_members m JOIN plan_groups g ON g.id = m.group_id "
                "WHERE g.plan_id = :p AND g.round = 0"
            ),
            {"p": plan_id},
        ).scalar_one()
    assert resumed >= 1, "the killed group resumed from zero, not from its checkpoint"
    assert dup == 0
    with service.client() as c:
        plan = _ok(c.get(f"/api/v1/plans/{plan_id}"))
    failing = [ch for ch in plan["chips"] if ch["status"] != "needs_nothing"]
    assert members == len(failing), "a chip was lost or duplicated in the round-0 groups"
    assert all(ch["status"] in TERMINAL_CHIP_STATES for ch in plan["chips"])


def test_a_group_taken_over_on_another_machine_resumes_from_the_database(tmp_path: Any) -> None:
    """FAULTFLEET_ARTIFACT_BACKEND=database: SIGKILL the worker once a group stored an epoch's
    checkpoint; a worker with another, empty artifact dir (another machine) resumes that group
    from there and finishes it (the rest of the plan is not waited for: bounded time)."""
    from tests.conftest import running_service

    disk_a, disk_b = tmp_path / "machine-a", tmp_path / "machine-b"
    with running_service(
        "postgres", tmp_path / "svc", FAULTFLEET_ARTIFACT_BACKEND="database", FAULTFLEET_ARTIFACT_DIR=str(disk_a)
    ) as service:
        grid = {"rates": [0.1, 0.2], "epochs": [0, 3], "samples": 1}
        fleet = _setup_fleet(service, n_chips=6, seed=11, arch="lenet5", grid=grid)
        plan_id = _plan(service, fleet, constraint={"max_drop": 0.005})
        engine = sa.create_engine(service.database_url)
        with service.client() as c:
            _ok(c.post(f"/api/v1/plans/{plan_id}/execute"), 202)
        deadline = time.monotonic() + 120
        while True:  # a group has stored the checkpoint of its first epoch in the database
            with engine.connect() as conn:
                row = conn.execute(
                    sa.text(
                        "SELECT j.id, j.params FROM jobs j JOIN checkpoint_files f "
                        "ON f.key = 'group-' || (j.params::json ->> 'group_id') "
                        "WHERE j.kind = 'retrain_group' AND j.state = 'running' LIMIT 1"
                    )
                ).first()
            if row is not None:
                break
            assert time.monotonic() < deadline, "no group retraining stored its first epoch"
            time.sleep(0.05)
        service.kill_worker()
        params = json.loads(row.params) if isinstance(row.params, str) else row.params
        key = f"group-{params['group_id']}"
        assert (disk_a / "checkpoints" / key).is_dir()
        service.env = {**service.env, "FAULTFLEET_ARTIFACT_DIR": str(disk_b)}
        service.start_worker()
        done = service.wait_job(row.id, timeout=90)
        assert done["state"] == "succeeded", done
        with engine.connect() as conn:
            result = conn.execute(sa.text("SELECT result FROM jobs WHERE id = :i"), {"i": row.id}).scalar_one()
            left = conn.execute(
                sa.text("SELECT count(*) FROM checkpoint_files WHERE key = :k OR key LIKE 'model-%'"), {"k": key}
            ).scalar_one()
        engine.dispose()
        resumed = (json.loads(result) if isinstance(result, str) else result)["resumed_from_epoch"]
        assert resumed >= 1, "the group taken over on machine B restarted from epoch 0"
        assert left == 0, "finished jobs left their checkpoints in the database"
        assert not (disk_b / "checkpoints" / key).exists()  # B resumed there, then dropped it


def test_a_robust_base_taken_over_on_another_machine_resumes_from_the_database(tmp_path: Any) -> None:
    """FAULTFLEET_ARTIFACT_BACKEND=database: SIGKILL the worker once the plan job's robust base
    stored an epoch's checkpoint; a worker with another, empty artifact dir (another machine)
    resumes the robust base from there, not from epoch 0, and the plan is built."""
    from tests.conftest import running_service

    disk_a, disk_b = tmp_path / "machine-a", tmp_path / "machine-b"
    with running_service(
        "postgres", tmp_path / "svc", FAULTFLEET_ARTIFACT_BACKEND="database", FAULTFLEET_ARTIFACT_DIR=str(disk_a)
    ) as service:
        grid = {"rates": [0.1, 0.2], "epochs": [0, 1, 2], "samples": 1}
        fleet = _setup_fleet(service, n_chips=6, seed=11, arch="lenet5", grid=grid)
        with service.client() as c:
            body = {
                "model": fleet["model"],
                "constraint": {"max_drop": 0.005},  # chips fail screening: the robust base trains
                "chips": {"ids": [m["chip_id"] for m in fleet["maps"]]},
                "resilience": grid,
                "resilience_map": "off",
                "robust_base": "on",
            }
            accepted = _ok(c.post("/api/v1/plans", json=body), 202)
        plan_id, job_id = int(accepted["plan"]["id"]), accepted["job"]["id"]
        key = f"robust-plan{plan_id}"
        engine = sa.create_engine(service.database_url)
        deadline = time.monotonic() + 180
        while True:  # the robust base has stored the checkpoint of its first epoch in the database
            with engine.connect() as conn:
                stored = conn.execute(sa.text("SELECT count(*) FROM checkpoint_files WHERE key = :k"), {"k": key})
                if stored.scalar_one():
                    break
                state = conn.execute(sa.text("SELECT state FROM jobs WHERE id = :i"), {"i": job_id}).scalar_one()
            assert state in ("queued", "running"), (
                f"the plan job ended ({state}) before its robust base stored an epoch"
            )
            assert time.monotonic() < deadline, "the robust base stored no epoch"
            time.sleep(0.05)
        service.kill_worker()
        assert (disk_a / "checkpoints" / key).is_dir()
        service.env = {**service.env, "FAULTFLEET_ARTIFACT_DIR": str(disk_b)}
        service.start_worker()
        done = service.wait_job(job_id, timeout=300)
        assert done["state"] == "succeeded", done
        with engine.connect() as conn:
            result = conn.execute(sa.text("SELECT result FROM jobs WHERE id = :i"), {"i": job_id}).scalar_one()
            left = conn.execute(
                sa.text("SELECT count(*) FROM checkpoint_files WHERE key = :k"), {"k": key}
            ).scalar_one()
        engine.dispose()
        result = json.loads(result) if isinstance(result, str) else result
        assert result["robust_base_resumed_from_epoch"] >= 1, "the robust base taken over on B restarted at epoch 0"
        with service.client() as c:
            decision = _ok(c.get(f"/api/v1/plans/{plan_id}"))["summary"]["decisions"]["robust_base"]
        assert decision["trained"] and decision["epochs"] >= 3, decision
        assert left == 0, "the finished plan job left its checkpoints in the database"
        assert not (disk_b / "checkpoints" / key).exists()  # B resumed there, then dropped it


def test_register_model_by_uploading_weights_and_a_dataset(service: Any, tmp_path: Any) -> None:
    """multipart: a user's .npz dataset and safetensors weights; the worker measures the same baseline."""
    import io

    import numpy as np
    from safetensors.torch import save as save_safetensors

    digits = acc.load_dataset("digits")
    buf = io.BytesIO()
    np.savez(
        buf,
        x_train=digits.x_train.numpy(),
        y_train=digits.y_train.numpy(),
        x_test=digits.x_test.numpy(),
        y_test=digits.y_test.numpy(),
    )
    data = acc.load_dataset("mydigits", _write(tmp_path / "d.npz", buf.getvalue()))
    model = acc.build_model("mlp", data.input_shape, data.num_classes, seed=1)
    acc.train(model, data, 3, lr=0.05, batch_size=64, seed=1)
    weights = save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()})
    tag = uuid.uuid4().hex[:6]
    accel = f"up-{tag}"
    with service.client() as c:
        _post_profile(c, accel, [])
        r = c.post(
            "/api/v1/models",
            data={"name": f"up-{tag}", "architecture": "mlp", "dataset": "mydigits", "accelerator": accel},
            files={"weights": ("w.safetensors", weights), "dataset_file": ("d.npz", buf.getvalue())},
        )
        accepted = _ok(r, 202)
        job = service.wait_job(accepted["job"]["id"], timeout=300)
        assert job["state"] == "succeeded", job
        got = _ok(c.get(f"/api/v1/models/up-{tag}"))
        # same name again: 409, and no second model row
        r = c.post(
            "/api/v1/models",
            data={"name": f"up-{tag}", "architecture": "mlp", "dataset": "mydigits", "accelerator": accel},
            files={"weights": ("w.safetensors", weights), "dataset_file": ("d.npz", buf.getvalue())},
        )
        assert r.status_code == 409
        bad = c.post(
            "/api/v1/models",
            data={"name": f"up2-{tag}", "architecture": "mlp", "dataset": "x", "accelerator": accel},
            files={"weights": ("w.safetensors", weights), "dataset_file": ("d.npz", b"garbage")},
        )
        assert bad.status_code == 422 and "dataset_file" in bad.json()["detail"]
        assert c.get(f"/api/v1/models/up2-{tag}").status_code == 404
    assert got["status"] == "ready" and got["dataset"] == "mydigits"
    assert got["baseline_accuracy"] == pytest.approx(
        acc.evaluate(model, ArrayConfig(ROWS, COLS), None, data), abs=1e-12
    )
    assert got["config"]["uploaded_weights_sha256"] == hashlib.sha256(weights).hexdigest()


def _write(path: Any, data: bytes) -> Any:
    path.write_bytes(data)
    return path


def _registered_mlp(service: Any, n_chips: int, seed: int) -> tuple[Any, Any, str, list[dict[str, Any]]]:
    """A small mlp trained on digits, registered with the service as `loop-<tag>` on a new
    accelerator whose `n_chips` chips are posted: (model, data, model name, maps)."""
    from workers.export import state_dict_bytes

    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    data = acc.load_dataset("digits")
    model = acc.build_model("mlp", data.input_shape, data.num_classes, seed=2)
    acc.train(model, data, 3, lr=0.05, batch_size=64, seed=2)
    acc.calibrate(model, data.x_train)
    weights = state_dict_bytes(model.state_dict())
    tag = uuid.uuid4().hex[:6]
    accel = f"loop-{tag}"
    maps = _fleet(accel, n_chips, seed=seed)
    with service.client() as c:
        _post_profile(c, accel, maps)
        reg = c.post(
            "/api/v1/models",
            data={"name": f"loop-{tag}", "architecture": "mlp", "dataset": "digits", "accelerator": accel},
            files={"weights": ("w.safetensors", weights)},
        )
        job = service.wait_job(_ok(reg, 202)["job"]["id"], timeout=300)
        assert job["state"] == "succeeded", job
    return model, data, f"loop-{tag}", maps


def test_the_service_and_the_bench_run_one_loop(embedded_service: Any) -> None:
    """The same fleet and base model through the service (jobs, fan-out, rows) and through
    `workers.pipeline.run_fleet` in this process give the same plan and the same group models."""
    from workers import pipeline as pl

    service = embedded_service
    torch = pytest.importorskip("torch")
    model, data, name, maps = _registered_mlp(service, 10, seed=11)
    settings = {"max_group_size": 3, "resilience": {"rates": [0.05, 0.1], "epochs": [0, 1, 2], "samples": 1}}
    plan_id = _plan(
        service,
        {"model": name, "maps": maps, "grid": settings["resilience"]},
        max_group_size=3,
        resilience_map="off",
        robust_base="off",
        train={"epoch_fraction": 0.5},  # retraining epochs of half the train split, here and there
    )
    passes_before = _group_passes_metric(service)
    served = _execute(service, plan_id)

    array = ArrayConfig(ROWS, COLS)
    em = pl.Emulation.of(array, data, pl.TrainConfig(epoch_fraction=0.5))
    here = pl.run_fleet(
        em,
        model,
        [FaultMap.from_dict(m, array=array) for m in maps],
        acc_constraint(0.03),
        pl.FleetSettings(max_group_size=3, robust_base="off", resilience_map="off", ladder=(0, 1, 2)),
    )
    groups_here = {g.group_id: (sorted(g.members), g.epochs, g.warm_from) for g in here.plan.groups}
    with service.client() as c:
        doc = _ok(c.get(f"/api/v1/plans/{plan_id}", params={"limit": 1000}))
    groups_there = {g["key"]: (sorted(m["chip_id"] for m in g["members"]), g["epochs"]) for g in doc["groups"]}
    assert {k: v[:2] for k, v in groups_here.items()} == groups_there
    states_there = {ch["chip_id"]: ch["status"] for ch in doc["chips"]}
    assert {c: st.status for c, st in here.plan.chips.items()} == states_there
    models_here = {lm.key.split(":", 1)[1]: lm.model for lm in here.library if lm.fused is not None}
    compared = 0
    for g in doc["groups"]:
        if g["key"] in models_here:  # a group model in the library: the same weights, trained here and there
            blob, _ = _download(service, f"/api/v1/groups/{g['id']}/model")
            there = load_safetensors(blob)
            mine = models_here[g["key"]].state_dict()
            assert there.keys() == mine.keys()
            # equal up to float summation order (the worker's thread count may differ from this process's)
            assert all(torch.allclose(there[k], mine[k], rtol=1e-4, atol=1e-5) for k in mine), g["key"]
            compared += 1
    assert compared > 0, "the fleet was built so that some group model serves a verified chip"
    assert served["summary"]["training_epochs_total"] == pytest.approx(here.ledger.training_epochs_total)
    # every group epoch read half the train split: the ledger charges half a pass for each
    assert here.ledger.epochs["groups"] == pytest.approx(0.5 * here.plan.planned_epochs)
    # and so does /metrics: faultfleet_epochs_trained counts full passes, as the ledger does
    trained_epochs = sum(g["epochs"] for g in doc["groups"] if g["model_sha256"])
    assert trained_epochs > 0
    assert _group_passes_metric(service) - passes_before == pytest.approx(0.5 * trained_epochs)


def _group_passes_metric(service: Any) -> float:
    """`faultfleet_epochs_trained_total{purpose="group_retraining"}` as /metrics answers it now."""
    from prometheus_client.parser import text_string_to_metric_families

    with service.client() as c:
        r = c.get("/metrics")
    assert r.status_code == 200, r.text[:300]
    for fam in text_string_to_metric_families(r.text):
        for x in fam.samples:
            if x.name == "faultfleet_epochs_trained_total" and x.labels == {"purpose": "group_retraining"}:
                return float(x.value)
    return 0.0


def test_a_plan_measures_the_adaptive_map_by_default(embedded_service: Any) -> None:
    """A plan with a measured map over a small fleet, through the real worker: the map is
    adaptive (built in the plan's job, no cell jobs), has cells not measured (null), costs
    fewer cell epochs than the full grid, and the plan, planned on it, executes to the end."""
    service = embedded_service
    _, _, name, maps = _registered_mlp(service, 10, seed=11)
    grid = {"rates": [0.02, 0.05, 0.1, 0.2], "epochs": [0, 1, 2, 4], "samples": 1}
    plan_id = _plan(service, {"model": name, "maps": maps, "grid": grid}, max_group_size=3, robust_base="off")
    with service.client() as c:
        planned = _ok(c.get(f"/api/v1/plans/{plan_id}"))
        rmap = _ok(c.get(f"/api/v1/resilience-maps/{planned['resilience_map_id']}"))
    assert (
        planned["params"]["map_cells"] == "adaptive" and planned["summary"]["decisions"]["resilience_map"] == "measured"
    )
    full_epochs = len(grid["rates"]) * grid["samples"] * max(grid["epochs"])
    assert rmap["status"] == "ready" and rmap["params"]["cells"] == "adaptive"
    worst = rmap["map"]["worst"]
    assert all(row[0] is not None for row in worst)  # the 0-epoch column: always measured
    assert any(v is None for row in worst for v in row)  # cells no chip's epochs depend on: not trained
    assert 0 < rmap["training_epochs"] < full_epochs  # some chips need retraining, and read some rates
    # the plan is charged exactly the cell epochs the map trained
    assert planned["summary"]["training_epochs"]["resilience_map"] == rmap["training_epochs"]
    engine = sa.create_engine(service.database_url)
    with engine.connect() as conn:
        cells = conn.execute(
            sa.text("SELECT count(*) FROM jobs WHERE kind = 'resilience_cell' AND parent_id = :p"),
            {"p": planned["jobs"]["plan"]},
        ).scalar_one()
    engine.dispose()
    assert cells == 0
    done = _execute(service, plan_id)
    assert done["status"] == "executed"
    assert all(ch["status"] in TERMINAL_CHIP_STATES for ch in done["chips"]), done["chips"]


def acc_constraint(max_drop: float) -> Any:
    from planner import AccuracyConstraint

    return AccuracyConstraint.relative(max_drop)


def test_the_service_grows_the_robust_base_as_the_loop_does(embedded_service: Any) -> None:
    """A plan with `robust_base: on`: the plan job climbs the robust base's ladder as
    `pipeline.plan_batch` does in this process (the same rungs, the same chips served),
    charges every rung, and puts the kept model in the library."""
    from workers import pipeline as pl

    service = embedded_service
    model, data, name, maps = _registered_mlp(service, 12, seed=13)
    grid = {"rates": [0.05, 0.1], "epochs": [0, 1, 2], "samples": 1}
    plan_id = _plan(
        service,
        {"model": name, "maps": maps, "grid": grid},
        max_group_size=3,
        resilience_map="off",
        robust_base="on",
    )
    with service.client() as c:
        summary = _ok(c.get(f"/api/v1/plans/{plan_id}"))["summary"]
        library = _ok(c.get(f"/api/v1/models/{name}/library"))
    there = summary["decisions"]["robust_base"]

    array = ArrayConfig(ROWS, COLS)
    em = pl.Emulation.of(array, data, pl.TrainConfig())
    here = pl.plan_batch(
        em,
        model,
        [FaultMap.from_dict(m, array=array) for m in maps],
        acc_constraint(0.03),
        pl.FleetSettings(max_group_size=3, robust_base="on", resilience_map="off", ladder=(0, 1, 2)),
    ).decisions["robust_base"]
    assert there["trained"] and there["rungs"], there
    assert [(r["epochs"], r["served"]) for r in there["rungs"]] == [(r["epochs"], r["served"]) for r in here["rungs"]]
    assert summary["ledger"]["epochs"]["robust_base"] == there["epochs"] == here["epochs"]
    rows = {m["key"]: m for m in library["models"]}
    if there["served"]:
        assert rows["robust"]["training_epochs"] == there["epochs"]
    else:
        assert "robust" not in rows
