"""`faultfleet run` (the embedded quick start) and the settings defaults."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.core.config import Settings


def test_embedded_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(__import__("os").environ):
        if k.startswith("FAULTFLEET_"):
            monkeypatch.delenv(k)
    monkeypatch.chdir(tmp_path)
    s = Settings()
    assert s.var_dir == tmp_path / "var"
    assert s.database_url == f"sqlite:///{tmp_path / 'var' / 'faultfleet.db'}"
    assert s.broker_url == "filesystem://" and s.broker_is_filesystem
    assert not hasattr(s, "result_backend")  # no Celery result backend: results live in the jobs table
    assert s.create_local_admin_key is True
    opts = s.broker_transport_options()
    assert opts["data_folder_in"] == opts["data_folder_out"] == str(tmp_path / "var" / "broker" / "queue")


def test_worker_device_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """FAULTFLEET_DEVICE: checked when settings load; 'auto' takes the GPU only where torch
    sees one; a GPU asked for on a machine without one fails by name, not deep in torch."""
    import torch

    from workers.store import worker_device

    assert Settings().device == "cpu" and worker_device(Settings()) == "cpu"
    monkeypatch.setenv("FAULTFLEET_DEVICE", "gpu")
    with pytest.raises(ValueError, match="device"):
        Settings()
    monkeypatch.setenv("FAULTFLEET_DEVICE", "auto")
    assert worker_device(Settings()) == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("FAULTFLEET_DEVICE", "cuda:0")
    if torch.cuda.is_available():
        assert worker_device(Settings()) == "cuda:0"
    else:
        with pytest.raises(RuntimeError, match="FAULTFLEET_DEVICE=cuda:0"):
            worker_device(Settings())


def test_scale_out_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAULTFLEET_DATABASE_URL", "postgresql+psycopg://u:p@db:5432/ff")
    monkeypatch.setenv("FAULTFLEET_BROKER_URL", "redis://redis:6379/0")
    monkeypatch.setenv("FAULTFLEET_RESULT_BACKEND", "redis://redis:6379/1")  # ignored: there is none
    monkeypatch.setenv("FAULTFLEET_REDIS_KEY_PREFIX", "tenant-a:")
    monkeypatch.setenv("FAULTFLEET_API_KEYS", '["ingest:abc"]')
    s = Settings()
    assert not s.is_sqlite and not s.broker_is_filesystem and s.create_local_admin_key is False
    assert s.broker_transport_options() == {
        "visibility_timeout": 600,
        "socket_connect_timeout": 2.0,
        "socket_timeout": 5.0,
        "global_keyprefix": "tenant-a:",
    }
    assert s.api_keys == ["ingest:abc"]


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_faultfleet_run_embedded_quick_start(tmp_path: Path, ff_tools: Any, sig: signal.Signals) -> None:
    """`faultfleet run`: migrate + worker + API on SQLite and the filesystem broker, the worker's
    logs in var/worker.log; Ctrl-C, SIGTERM and SIGHUP each stop the API and the worker with
    every process they started (uvicorn re-raised SIGTERM and orphaned the worker before)."""
    port = ff_tools.free_port()
    env = ff_tools.base_env(FAULTFLEET_VAR_DIR=str(tmp_path / "var"))
    proc = ff_tools.start_proc([ff_tools.PY, "-m", "app.cli", "run", "--port", str(port)], env, tmp_path, "run")
    children: list[int] = []
    try:
        url = f"http://127.0.0.1:{port}"
        ff_tools.wait_ready(url, proc)
        key = (tmp_path / "var" / "admin.key").read_text().strip()
        assert "admin.key" in proc.log_tail()
        h = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=url, headers=h, timeout=30) as c:
            assert c.post("/api/v1/accelerators", json={"name": "sa8", "rows": 8, "cols": 8}).status_code == 201
            m = ff_tools.random_fault_map("Q1", "sa8", rows=8, cols=8, rate=0.05)
            assert c.post("/api/v1/chips", json=m).status_code == 201
            job = c.post("/api/v1/fleet/stats", json={}).json()
            deadline = time.monotonic() + 60
            while (state := c.get(f"/api/v1/jobs/{job['id']}").json())["state"] != "succeeded":
                assert state["state"] in ("queued", "running") and time.monotonic() < deadline, state
                time.sleep(0.1)
            assert state["result"]["chips"] == 1
        worker_log = (tmp_path / "var" / "worker.log").read_text()
        assert "ready." in worker_log, worker_log[-2000:]
        console = proc.log_tail(100_000)
        assert "celery@" not in console and "ready." not in console, "worker logs reached the console"
        children += _descendants(proc.popen.pid)
        assert len(children) >= 2, f"worker and its pool missing: {children}"
        proc.popen.send_signal(sig)
        assert proc.popen.wait(timeout=30) == 0, proc.log_tail()
        deadline = time.monotonic() + 20
        while (alive := [p for p in children if _alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive, f"still running after {sig.name}: {alive}"
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/healthz", timeout=2)
        assert f"stopped ({sig.name})" in proc.log_tail()
    finally:
        if proc.alive():
            proc.kill()
        for pid in children:  # the worker runs in a session of its own: not in proc's process group
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_make_run_stops_when_make_is_killed(tmp_path: Path, ff_tools: Any, sig: signal.Signals) -> None:
    """`make run` and a signal to make alone (`kill PID`, not to its process group): the service and
    its worker stop too. GNU make passes SIGTERM on to its recipe; after SIGKILL `faultfleet run`
    went on serving, orphaned, until `--exit-with-parent`. (SIGHUP or SIGINT to make alone: make
    passes neither on and waits for its recipe, so the service runs on under a live make; from a
    terminal both reach the whole foreground process group, and `run` stops on each.)"""
    import shutil
    import subprocess
    import sys

    make = shutil.which("make")
    if make is None:
        from tests.conftest import unavailable

        unavailable("make missing: apt-get install make")
    root = Path(__file__).resolve().parents[2]
    port = ff_tools.free_port()
    env = ff_tools.base_env(FAULTFLEET_VAR_DIR=str(tmp_path / "var"), FAULTFLEET_PORT=str(port))
    log = tmp_path / "make.log"
    # this interpreter's environment for $(BIN); `-o install`: never (re)install from a test
    argv = [make, "-C", str(root), "-o", "install", f"VENV={sys.prefix}", "run"]
    with log.open("ab") as fh:
        popen = subprocess.Popen(argv, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    proc = ff_tools.Proc(popen, log, "make")
    tree: list[int] = []
    try:
        ff_tools.wait_ready(f"http://127.0.0.1:{port}", proc)
        deadline = time.monotonic() + 20
        while len(tree := _descendants(popen.pid)) < 3:  # faultfleet run, its worker, the worker's pool
            assert time.monotonic() < deadline and proc.alive(), f"no worker under make run: {tree}\n{proc.log_tail()}"
            time.sleep(0.1)
        os.kill(popen.pid, sig)  # make alone: not its process group
        deadline = time.monotonic() + 40  # the worker's warm shutdown may wait 15 s for the demo's job
        while (alive := [p for p in tree if _alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive, f"still running {time.monotonic() - deadline + 40:.0f} s after {sig.name} to make: {alive}"
        popen.wait(timeout=10)
        assert "stopped (SIGTERM)" in proc.log_tail(), proc.log_tail()
    finally:
        for pid in [popen.pid, *tree]:  # by id: make's session holds nothing else of ours
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        popen.wait(timeout=10)


def _descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
