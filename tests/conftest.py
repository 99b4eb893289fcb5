"""Shared fixtures for tests that need the running service (reused by later end-to-end suites).

- `postgres_url` / `redis_url`: the machine's PostgreSQL and Redis; unreachable -> skip with a
  visible reason, or fail when CI=true.
- `fresh_pg_database()`: a context manager creating database ff_<random> (dropped afterwards).
- `service`: a real uvicorn + a real `celery worker`, parametrized over
  "postgres" (PostgreSQL + Redis, own database, own queue and Redis key prefix) and
  "embedded" (SQLite + filesystem broker in a tmp dir). Session-scoped; see `Service`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

PG_ADMIN_URL = os.environ.get("FAULTFLEET_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("FAULTFLEET_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PY = sys.executable

# Fast recovery timings for tests, and the worker device (production defaults are in app/core/config.py).
FAST_JOB_ENV = {
    "FAULTFLEET_JOB_HEARTBEAT_S": "0.5",
    "FAULTFLEET_JOB_STALE_AFTER_S": "3",
    "FAULTFLEET_JOB_SWEEP_INTERVAL_S": "0.5",
    "FAULTFLEET_JOB_REQUEUE_QUEUED_AFTER_S": "20",
    "FAULTFLEET_BROKER_POLLING_INTERVAL_S": "0.1",
    "FAULTFLEET_BROKER_VISIBILITY_TIMEOUT_S": "30",
    "FAULTFLEET_AUTH_CACHE_S": "1",
    # workers resolve the device themselves: the GPU on a machine with one, else the CPU
    "FAULTFLEET_DEVICE": "auto",
}


def unavailable(reason: str) -> None:
    """Skip (or, under CI=true, fail) because a required service is unreachable."""
    if IN_CI:
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


def _pg_error() -> str | None:
    try:
        import psycopg

        with psycopg.connect(_libpq(PG_ADMIN_URL), connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return None
    except Exception as exc:
        return f"PostgreSQL unreachable at {PG_ADMIN_URL}: {type(exc).__name__}: {exc}".strip()


def _redis_error() -> str | None:
    try:
        import redis

        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
        return None
    except Exception as exc:
        return f"Redis unreachable at {REDIS_URL}: {type(exc).__name__}: {exc}".strip()


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    err = _pg_error()
    if err:
        unavailable(err)
    return PG_ADMIN_URL


@pytest.fixture(scope="session")
def redis_url() -> str:
    err = _redis_error()
    if err:
        unavailable(err)
    return REDIS_URL


@contextlib.contextmanager
def fresh_pg_database(admin_url: str = PG_ADMIN_URL) -> Iterator[str]:
    """Create database ff_<random> on the server of `admin_url`; yield its URL; drop it."""
    import psycopg

    name = f"ff_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_libpq(admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _db = admin_url.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(_libpq(admin_url), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    """A subprocess in its own session (so a SIGKILL takes its whole process tree)."""

    popen: subprocess.Popen[bytes]
    log: Path
    name: str

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL the process group: no cleanup, no ack, like a machine losing power."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)

    def stop(self, timeout: float = 15.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGTERM)  # the main process shuts its children down
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()


def start_proc(argv: list[str], env: dict[str, str], cwd: Path, name: str) -> Proc:
    log = cwd / f"{name}.log"
    fh = log.open("ab")
    popen = subprocess.Popen(argv, env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    fh.close()
    return Proc(popen, log, name)


def run_cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "app.cli", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


@dataclass
class Service:
    """A running faultfleet: API (uvicorn subprocess) + one Celery worker subprocess."""

    name: str
    env: dict[str, str]
    workdir: Path
    base_url: str
    admin_key: str
    database_url: str
    api: Proc | None = None
    worker: Proc | None = None
    _workers_started: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def client(self, key: str | None = None, timeout: float = 60.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key if key is not None else self.admin_key}"} if key != "" else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run_cli(list(args), self.env, self.workdir, timeout)

    def create_key(self, *scopes: str) -> str:
        argv = ["keys", "create"]
        for s in scopes:
            argv += ["--scope", s]
        res = self.cli(*argv)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()

    def start_api(self) -> None:
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        self.api = start_proc(
            [PY, "-m", "app.cli", "serve", "--port", str(port), "--no-access-log", "--log-level", "warning"],
            self.env,
            self.workdir,
            "api",
        )
        wait_ready(self.base_url, self.api)

    def start_worker(self, concurrency: int = 2) -> Proc:
        self._workers_started += 1
        n = self._workers_started
        node = f"w{n}-{uuid.uuid4().hex[:6]}@%h"
        proc = start_proc(
            [PY, "-m", "app.cli", "worker", "--concurrency", str(concurrency), "--hostname", node],
            self.env,
            self.workdir,
            f"worker{n}",
        )
        deadline = time.monotonic() + 60
        while "ready." not in proc.log_tail(100_000):
            if not proc.alive():
                raise RuntimeError(f"worker exited:\n{proc.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker not ready in 60 s:\n{proc.log_tail()}")
            time.sleep(0.1)
        self.worker = proc
        return proc

    def kill_worker(self) -> None:
        assert self.worker is not None
        self.worker.kill()
        self.worker = None

    def wait_job(
        self, job_id: str, timeout: float = 60.0, states: tuple[str, ...] = ("succeeded", "failed", "cancelled")
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self.client() as c:
            while True:
                r = c.get(f"/api/v1/jobs/{job_id}")
                assert r.status_code == 200, r.text
                job = r.json()
                if job["state"] in states:
                    return job
                if time.monotonic() > deadline:
                    worker_log = self.worker.log_tail() if self.worker else ""
                    raise AssertionError(f"job {job_id} still {job['state']} after {timeout}s: {job}\n{worker_log}")
                time.sleep(0.1)

    def stop(self) -> None:
        for p in (self.worker, self.api):
            if p is not None:
                p.stop()


def wait_ready(base_url: str, proc: Proc, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.log_tail()}")
        try:
            r = httpx.get(f"{base_url}/readyz", timeout=2)
            if r.status_code == 200:
                return
            last = r.text
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.1)
    raise RuntimeError(f"{base_url} not ready in {timeout}s ({last}):\n{proc.log_tail()}")


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAULTFLEET_")}
    env.update(FAST_JOB_ENV)
    env.update(extra)
    env["PYTHONUNBUFFERED"] = "1"
    # Subprocesses run in tmp dirs: import this checkout's packages whatever the install state.
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return env


def _flush_redis_prefix(prefix: str) -> None:
    import redis

    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(match=f"{prefix}*", count=1000))
    for i in range(0, len(keys), 500):
        r.delete(*keys[i : i + 500])


@contextlib.contextmanager
def running_service(kind: str, workdir: Path, **env_extra: str) -> Iterator[Service]:
    """Start a migrated, running service of `kind` ("postgres" or "embedded") in `workdir`."""
    workdir.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:10]
    with contextlib.ExitStack() as stack:
        if kind == "postgres":
            err = _pg_error() or _redis_error()
            if err:
                unavailable(err)
            db_url = stack.enter_context(fresh_pg_database())
            prefix = f"fftest-{tag}:"
            stack.callback(_flush_redis_prefix, prefix)
            env = base_env(
                FAULTFLEET_DATABASE_URL=db_url,
                FAULTFLEET_BROKER_URL=REDIS_URL,
                FAULTFLEET_QUEUE=f"fftest-{tag}",
                FAULTFLEET_REDIS_KEY_PREFIX=prefix,
                FAULTFLEET_VAR_DIR=str(workdir / "var"),
                **env_extra,
            )
        elif kind == "embedded":
            env = base_env(FAULTFLEET_VAR_DIR=str(workdir / "var"), **env_extra)
            db_url = f"sqlite:///{workdir / 'var' / 'faultfleet.db'}"
        else:
            raise ValueError(kind)
        res = run_cli(["migrate"], env, workdir)
        assert res.returncode == 0, res.stderr
        if kind == "embedded":
            admin_key = (workdir / "var" / "admin.key").read_text().strip()
        else:
            res = run_cli(["keys", "create", "--scope", "admin", "--name", "test admin"], env, workdir)
            assert res.returncode == 0, res.stderr
            admin_key = res.stdout.strip()
        svc = Service(kind, env, workdir, "", admin_key, db_url)
        stack.callback(svc.stop)
        svc.start_api()
        svc.start_worker()
        yield svc


class ServicePool:
    """Starts each kind of service once per test session, on first use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.stack = contextlib.ExitStack()
        self.running: dict[str, Service] = {}

    def get(self, kind: str) -> Service:
        if kind not in self.running:
            self.running[kind] = self.stack.enter_context(running_service(kind, self.root / kind))
        return self.running[kind]


@pytest.fixture(scope="session")
def service_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServicePool]:
    pool = ServicePool(tmp_path_factory.mktemp("services"))
    with pool.stack:
        yield pool


@pytest.fixture(scope="session", params=["postgres", "embedded"])
def service(request: pytest.FixtureRequest, service_pool: ServicePool) -> Service:
    """A running service per backend (session-scoped: tests must not assume an empty database)."""
    return service_pool.get(request.param)


@pytest.fixture(scope="session")
def pg_service(service_pool: ServicePool) -> Service:
    """The PostgreSQL + Redis service (for tests that only make sense there)."""
    return service_pool.get("postgres")


@pytest.fixture(scope="session")
def embedded_service(service_pool: ServicePool) -> Service:
    """The embedded default service (SQLite + filesystem broker)."""
    return service_pool.get("embedded")


def random_fault_map(
    chip_id: str,
    accelerator: str,
    rows: int = 32,
    cols: int = 32,
    rate: float = 0.01,
    seed: int | None = None,
    lot: str | None = None,
    wafer: int | None = None,
) -> dict[str, Any]:
    """A realistic fault map: `rate` of the PEs faulty, each with one fault of a random site."""
    import random

    rnd = random.Random(seed if seed is not None else chip_id)
    n = max(1, round(rate * rows * cols))
    pes = rnd.sample(range(rows * cols), n)
    faults: list[dict[str, Any]] = []
    for pe in pes:
        r, c = divmod(pe, cols)
        site = rnd.choice(("pe", "weight", "act", "psum"))
        if site == "pe":
            faults.append({"row": r, "col": c, "site": "pe"})
        else:
            bit = rnd.randrange(32 if site == "psum" else 8)
            faults.append({"row": r, "col": c, "site": site, "bit": bit, "stuck": rnd.randrange(2)})
    d: dict[str, Any] = {"chip_id": chip_id, "accelerator": accelerator, "array": {"rows": rows, "cols": cols}}
    d["faults"] = faults
    if lot is not None:
        d["lot"] = lot
    if wafer is not None:
        d["wafer"] = wafer
    return d


@pytest.fixture
def make_map() -> Any:
    return random_fault_map


@pytest.fixture
def accelerator(service: Service) -> str:
    """A fresh 32x32 int8 profile with bypass on the `service` under test; returns its name."""
    name = f"sa32-{uuid.uuid4().hex[:8]}"
    with service.client() as c:
        r = c.post("/api/v1/accelerators", json={"name": name, "rows": 32, "cols": 32, "fmt": "int8", "bypass": True})
        assert r.status_code == 201, r.text
    return name


@pytest.fixture
def uid() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture
def pg_database(postgres_admin_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database (ff_<random>) for this test; dropped afterwards."""
    with fresh_pg_database(postgres_admin_url) as url:
        yield url


@pytest.fixture
def api_on_fresh_pg(pg_database: str, redis_url: str, tmp_path: Path) -> Iterator[Service]:
    """An API alone (no worker: jobs stay queued) on a fresh PostgreSQL database; key admin_key."""
    tag = uuid.uuid4().hex[:8]
    env = base_env(
        FAULTFLEET_DATABASE_URL=pg_database,
        FAULTFLEET_BROKER_URL=redis_url,
        FAULTFLEET_QUEUE=f"ffconc-{tag}",
        FAULTFLEET_REDIS_KEY_PREFIX=f"ffconc-{tag}:",
        FAULTFLEET_VAR_DIR=str(tmp_path / "var"),
        FAULTFLEET_API_KEYS=f'["admin:k-{tag}"]',
    )
    assert run_cli(["migrate"], env, tmp_path).returncode == 0
    svc = Service("api-only", env, tmp_path, "", f"k-{tag}", pg_database)
    try:
        svc.start_api()
        yield svc
    finally:
        svc.stop()
        _flush_redis_prefix(f"ffconc-{tag}:")


@pytest.fixture(scope="session")
def ff_tools() -> Any:
    """The helpers of this conftest, for tests that start their own processes."""
    from types import SimpleNamespace

    return SimpleNamespace(
        PY=PY,
        Service=Service,
        Proc=Proc,
        free_port=free_port,
        start_proc=start_proc,
        run_cli=run_cli,
        wait_ready=wait_ready,
        base_env=base_env,
        running_service=running_service,
        random_fault_map=random_fault_map,
    )
