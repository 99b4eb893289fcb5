"""Fixtures of the tools' tests (the `faultfleet` client commands and the dashboard): the real
`faultfleet` process against the session's running service, and one small trained fleet."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from dataclasses import dataclass
from typing import Any

import pytest


def faultfleet_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "app.cli", *args]


def ff(service: Any, *args: str, key: str | None = None, url: str | None = None) -> subprocess.CompletedProcess[str]:
    """`faultfleet ARGS` against `service`, the URL and key from the environment as a user would set them."""
    env = dict(service.env, FAULTFLEET_URL=url or service.base_url, FAULTFLEET_API_KEY=key or service.admin_key)
    return subprocess.run(
        faultfleet_argv(*args), env=env, cwd=service.workdir, capture_output=True, text=True, timeout=900, check=False
    )


@dataclass
class TrainedFleet:
    """Eight chips of an 8x8 profile (one lot and wafer, with die coordinates) and a trained mlp."""

    service: Any
    accelerator: str
    model: str
    chip_ids: list[str]
    grid: list[str]

    def plan(self, *extra: str) -> dict[str, Any]:
        """A new plan of these chips (the resilience map is measured once, then reused), planned."""
        ids = ["--chip=" + c for c in self.chip_ids]
        res = ff(
            self.service, "plan", "create", "--model", self.model, "--max-drop", "0.03", *ids,
            "--max-group-size", "4", *self.grid, "--wait", "--json", *extra,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        plan = json.loads(res.stdout)
        assert plan["status"] == "planned", plan
        return dict(plan)


@pytest.fixture(scope="session")
def trained_fleet(embedded_service: Any, tmp_path_factory: pytest.TempPathFactory) -> TrainedFleet:
    from accelerator import ArrayConfig
    from planner import FleetSpec, generate_fleet

    svc = embedded_service
    tag = uuid.uuid4().hex[:6]
    accel = f"tools-{tag}"
    with svc.client() as c:
        assert c.post("/api/v1/accelerators", json={"name": accel, "rows": 8, "cols": 8}).status_code == 201
    spec = FleetSpec(array=ArrayConfig(8, 8), accelerator=accel, defects_per_die=2.5, cluster_mean_pes=2.0)
    maps = [m.to_dict() for m in generate_fleet(8, 3, spec)]
    for i, m in enumerate(maps):
        m["chip_id"] = f"{accel}-{m['chip_id']}"
        m.update(lot=f"LOT-{tag}", wafer=1, die_x=i % 4, die_y=i // 4)
    path = tmp_path_factory.mktemp("fleet") / "fleet.ndjson"
    path.write_text("".join(json.dumps(m) + "\n" for m in maps))
    res = ff(svc, "chips", "upload", str(path), "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["created"] == 8, res.stdout + res.stderr
    model = f"m-{tag}"
    with svc.client() as c:
        body = {"name": model, "architecture": "mlp", "dataset": "digits", "accelerator": accel, "train": True}
        reg = c.post("/api/v1/models", json={**body, "epochs": 12})
        assert reg.status_code == 202, reg.text
    res = ff(svc, "jobs", "watch", reg.json()["job"]["id"], "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["state"] == "succeeded", res.stderr
    grid = ["--rates", "0.05,0.1,0.2", "--epochs", "0,1,3", "--samples", "1"]
    grid += ["--resilience-map", "on", "--robust-base", "off"]  # a map to draw; no extra training
    return TrainedFleet(svc, accel, model, [m["chip_id"] for m in maps], grid)
