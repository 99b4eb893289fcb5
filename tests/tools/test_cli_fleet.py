"""A small fleet through the `faultfleet` client commands against a real API and worker: upload,
plan create --wait, plan execute --watch, plan show, models download (sha256 against the ETag),
and /metrics scraped before and after the execution."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.tools.conftest import TrainedFleet, faultfleet_argv, ff

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _metrics(service: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = httpx.get(f"{service.base_url}/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text[:300]
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _jobs(m: dict[Any, float], kind: str, state: str) -> float:
    return m.get(("faultfleet_jobs", (("kind", kind), ("state", state))), 0.0)


def test_plan_execute_download_and_metrics(trained_fleet: TrainedFleet, tmp_path: Path) -> None:
    svc = trained_fleet.service
    plan = trained_fleet.plan()
    assert plan["summary"]["chips"] == 8, plan

    before = _metrics(svc)
    res = ff(svc, "plan", "execute", str(plan["id"]), "--watch", "--json")
    assert res.returncode == 0, res.stderr
    executed = json.loads(res.stdout)
    assert executed["status"] == "executed", executed
    after = _metrics(svc)

    # /metrics: the execution and each of its group jobs counted once, and nothing else changed state
    exec_job = executed["jobs"]["execute_plan"]
    with svc.client() as c:
        children = c.get(f"/api/v1/jobs/{exec_job}/children").json()
    retrains = [j for j in children if j["kind"] == "retrain_group"]
    assert retrains and all(j["state"] == "succeeded" for j in retrains)
    assert _jobs(after, "execute_plan", "succeeded") - _jobs(before, "execute_plan", "succeeded") == 1
    assert _jobs(after, "retrain_group", "succeeded") - _jobs(before, "retrain_group", "succeeded") == len(retrains)
    assert after[("faultfleet_queue_depth", ())] >= 0
    trained_epochs = sum(g["epochs"] for g in executed["groups"] if g["model_sha256"])
    key = ("faultfleet_epochs_trained_total", (("purpose", "group_retraining"),))
    assert after[key] - before.get(key, 0.0) == trained_epochs
    verified = sum(1 for ch in executed["chips"] if ch["status"] == "verified")
    vkey = ("faultfleet_chips", (("state", "verified"),))
    assert after[vkey] >= verified  # (the same chips may already be verified by another plan)
    dkey = ("faultfleet_job_duration_seconds_count", (("kind", "retrain_group"),))
    assert after[dkey] - before.get(dkey, 0.0) == len(retrains)
    route = ("method", "GET"), ("route", "/api/v1/plans/{plan_id}"), ("status", "200")
    assert after[("faultfleet_http_requests_total", route)] >= 1

    # plan show: a table of groups and the cost against the per-chip alternatives
    res = ff(svc, "plan", "show", str(plan["id"]))
    assert res.returncode == 0, res.stderr
    assert "groups" in res.stdout and "per-chip FAT" in res.stdout and "each chip alone" in res.stdout
    first = executed["groups"][0]
    assert any(str(first["id"]) in ln and first["status"] in ln for ln in res.stdout.splitlines())

    # models download: every file checked against its ETag (= its sha256), and again: unchanged
    out = tmp_path / "models"
    res = ff(svc, "models", "download", "--plan", str(plan["id"]), "--out", str(out), "--json")
    assert res.returncode == 0, res.stderr
    files = json.loads(res.stdout)
    trained = [g for g in executed["groups"] if g["model_sha256"]]
    assert len(files) == 2 * len(trained)
    for f in files:
        assert hashlib.sha256(Path(f["file"]).read_bytes()).hexdigest() == f["sha256"]
    assert {f["sha256"] for f in files} >= {g["model_sha256"] for g in trained}
    res = ff(svc, "models", "download", "--group", str(trained[0]["id"]), "--out", str(out), "--json")
    assert res.returncode == 0 and {f["status"] for f in json.loads(res.stdout)} == {"unchanged"}, res.stdout
    chip = next(ch["chip_id"] for ch in executed["chips"] if ch["status"] in ("verified", "needs_nothing"))
    res = ff(svc, "models", "download", "--chip", chip, "--out", str(out / "chip"), "--json")
    assert res.returncode == 0, res.stderr
    for f in json.loads(res.stdout):
        assert hashlib.sha256(Path(f["file"]).read_bytes()).hexdigest() == f["sha256"]
    manifest = json.loads(
        next(Path(f["file"]) for f in json.loads(res.stdout) if f["file"].endswith(".json")).read_text()
    )
    assert manifest["chip_id"] == chip


class _LyingHandler(http.server.BaseHTTPRequestHandler):
    """Serves a model whose bytes do not match the ETag it announces (a corrupted transfer or store)."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = b"not the model you are looking for"
        self.send_response(200)
        self.send_header("ETag", '"' + hashlib.sha256(b"the real model").hexdigest() + '"')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def lying_server() -> Iterator[str]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _LyingHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def test_download_refuses_a_file_that_does_not_match_its_etag(lying_server: str, tmp_path: Path) -> None:
    import subprocess

    res = subprocess.run(
        faultfleet_argv(
            "models", "download", "--group", "1", "--out", str(tmp_path), "--url", lying_server, "--api-key", "k"
        ),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 1, res.stderr
    assert "does not match the server's ETag" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
