"""The service's own commands: ``faultfleet migrate | serve | worker | keys | run | demo``."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any

import typer

from app.cli.api import CliError

if TYPE_CHECKING:
    from app.core.config import Settings

app = typer.Typer()
keys_app = typer.Typer(help="API keys (stored as sha256 hashes; a key is shown once).", no_args_is_help=True)

# What stops `run` and `demo` cleanly: Ctrl-C, `kill`, and a closed terminal.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _settings() -> Settings:
    from app.core.config import get_settings

    return get_settings()


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- migrate, serve, worker, keys ---------------------------------------------------------------


@app.command("migrate")
def migrate(revision: Annotated[str, typer.Argument(help="Alembic revision")] = "head") -> None:
    """Apply the Alembic migrations to the configured database."""
    from app.db import migrate as dbmigrate

    settings = _settings()
    settings.ensure_dirs()
    dbmigrate.upgrade(settings.database_url, revision)
    _say(f"database migrated to {revision}: {_redact(settings.database_url)}")
    if settings.create_local_admin_key:
        _local_admin_key()


def _local_admin_key() -> None:
    from app.db.session import session_scope
    from app.services.keys import ensure_local_admin_key

    settings = _settings()
    with session_scope() as s:
        created = ensure_local_admin_key(s, settings)
    path = settings.local_admin_key_file
    if created:
        _say(f"created a local admin API key in {path} (send it as 'Authorization: Bearer <key>')")
    else:
        _say(f"local admin API key: {path}")


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


@app.command("serve")
def serve(
    host: Annotated[str, typer.Option(envvar="FAULTFLEET_HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="FAULTFLEET_PORT")] = 8000,
    workers: Annotated[
        int | None, typer.Option(help="uvicorn processes [default: FAULTFLEET_API_WORKERS or 1]")
    ] = None,
    log_level: str = "info",
    no_access_log: bool = False,
) -> None:
    """Run the API (uvicorn)."""
    import uvicorn

    settings = _settings()
    workers = workers or settings.api_workers
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # /metrics merges the HTTP counters of every process through files in a fresh folder
        folder = settings.var_dir / "prometheus-multiproc" / str(os.getpid())
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    else:
        folder = None
    try:
        uvicorn.run(
            "app.main:app",
            host=host,
            port=port,
            workers=workers,
            log_level=log_level,
            access_log=not no_access_log,
        )
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def _worker_argv(loglevel: str, concurrency: int | None, pool: str | None, hostname: str | None) -> list[str]:
    settings = _settings()
    argv = ["worker", "--loglevel", loglevel, "-Q", settings.queue]
    argv += ["--pool", pool or settings.worker_pool]
    concurrency = concurrency or settings.worker_concurrency
    if concurrency:
        argv += ["--concurrency", str(concurrency)]
    if hostname:
        argv += ["--hostname", hostname]
    if settings.broker_is_filesystem:
        argv += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    return argv


@app.command("worker")
def worker(
    concurrency: int | None = None,
    pool: Annotated[str | None, typer.Option(help="prefork (default), threads or solo")] = None,
    hostname: Annotated[str | None, typer.Option(help="Celery node name, e.g. w1@%h")] = None,
    loglevel: str = "INFO",
) -> None:
    """Run a Celery worker on the configured broker."""
    from workers.celery_app import celery_app

    celery_app.worker_main(_worker_argv(loglevel, concurrency, pool, hostname))


@keys_app.command("create")
def keys_create(
    scope: Annotated[list[str], typer.Option(help="ingest, plan, read or admin (repeatable, or comma-separated)")],
    name: str = "",
) -> None:
    """Create an API key and print it (shown once)."""
    from app.db.session import session_scope
    from app.services.keys import create_key

    scopes = [s for group in scope for s in group.replace(",", " ").split()]
    try:
        with session_scope() as s:
            key, row = create_key(s, scopes, name=name)
    except ValueError as exc:
        raise CliError(str(exc), exit_code=2) from None
    print(key)
    _say(f"created key {row.prefix}... with scope(s) {row.scopes}; it is shown only once")


@keys_app.command("list")
def keys_list() -> None:
    """List keys (prefix, scopes, state; never the key)."""
    from sqlalchemy import select

    from app.db.models import ApiKey
    from app.db.session import session_scope

    with session_scope() as s:
        for k in s.scalars(select(ApiKey).order_by(ApiKey.id)):
            state = f"revoked {k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "active"
            print(f"{k.prefix}...\t{k.scopes}\t{state}\t{k.name}")


@keys_app.command("revoke")
def keys_revoke(prefix: Annotated[str, typer.Argument(help="the key's prefix, as `keys list` shows it")]) -> None:
    """Revoke the key with this prefix."""
    from sqlalchemy import update

    from app.db.base import utcnow
    from app.db.models import ApiKey
    from app.db.session import session_scope

    prefix = prefix.rstrip(".")
    with session_scope() as s:
        n = s.execute(
            update(ApiKey).where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow())
        ).rowcount  # type: ignore[attr-defined]
    if not n:
        raise CliError(f"no active key with prefix {prefix!r}")
    print(f"revoked {n} key(s) {prefix}...; API processes stop accepting it within FAULTFLEET_AUTH_CACHE_S")


# --- child processes of `run` and `demo` ----------------------------------------------------------


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the parent dies, even by SIGKILL."""
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _exit_with_parent() -> None:
    """This process gets SIGTERM when its parent ends (Linux's PR_SET_PDEATHSIG), at once if
    that already happened; elsewhere a warning. make, killed by SIGHUP, SIGINT or SIGKILL sent to
    it alone, exits without passing the signal on, and `run` would go on serving, orphaned."""
    import ctypes

    parent = os.getppid()
    try:
        if not sys.platform.startswith("linux"):
            raise OSError(f"not supported on {sys.platform}")
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGTERM) != 0:  # PR_SET_PDEATHSIG
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    except (OSError, AttributeError) as exc:
        _say(f"faultfleet: --exit-with-parent: {exc}; stop this process yourself")
        return
    if os.getppid() != parent:  # the parent ended before the call: no signal will come
        os.kill(os.getpid(), signal.SIGTERM)


def _spawn(argv: list[str], log: IO[bytes] | None) -> subprocess.Popen[bytes]:
    """A child in its own session: the terminal's Ctrl-C and hang-up reach only this process,
    which stops the child itself (Celery would take SIGHUP as "restart")."""
    return subprocess.Popen(
        argv,
        stdout=log,
        stderr=subprocess.STDOUT if log is not None else None,
        env=os.environ.copy(),
        start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )


def _stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM (Celery: warm shutdown, uvicorn: graceful), then SIGKILL to the child's whole process group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        # past the timeout: a job it was running is recovered by the next worker's sweep
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # pool processes left behind, if any
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP end the main thread like Ctrl-C does, so that `finally` blocks run."""

    def handler(sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(sig).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_ready(url: str, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"the API at {url} was not ready after {timeout:.0f} s")


def _admin_key() -> str:
    key = os.environ.get("FAULTFLEET_API_KEY")
    if key:
        return key
    path = _settings().local_admin_key_file
    if not path.exists():
        raise CliError(f"no API key: set FAULTFLEET_API_KEY or run 'faultfleet migrate' to create {path}")
    return path.read_text().strip()


ChipsOpt = Annotated[int, typer.Option(help="fleet size (demo)")]
SeedOpt = Annotated[int, typer.Option(help="fleet generator seed (demo)")]
OutOpt = Annotated[str | None, typer.Option(help="download folder (demo) [default: <var_dir>/demo]")]


def _demo_config(chips: int, seed: int, out: str | None) -> Any:
    from app.demo import DemoConfig

    return DemoConfig(chips=chips, seed=seed, out_dir=Path(out or _settings().var_dir / "demo"))


# --- demo, run -----------------------------------------------------------------------------------


@app.command("demo")
def demo(
    url: Annotated[str | None, typer.Option(help="a running faultfleet API (key from FAULTFLEET_API_KEY)")] = None,
    chips: ChipsOpt = 60,
    seed: SeedOpt = 7,
    out: OutOpt = None,
) -> None:
    """A generated fleet through the whole service (starts an embedded one without --url)."""
    from app.demo import run_demo

    cfg = _demo_config(chips, seed, out)
    if url:
        run_demo(url.rstrip("/"), _admin_key(), cfg)
        return
    migrate("head")
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}"
    log_path = _settings().var_dir / "demo-services.log"
    argv = [sys.executable, "-m", "app.cli"]
    with log_path.open("ab") as log, _signals_raise():
        procs = []
        try:
            procs.append(_spawn([*argv, "worker", "--loglevel", "WARNING", "--concurrency", "2"], log))
            procs.append(
                _spawn([*argv, "serve", "--port", str(port), "--log-level", "warning", "--no-access-log"], log)
            )
            _say(f"faultfleet: embedded worker and API on {api_url}; their logs go to {log_path}")
            _wait_ready(api_url)
            run_demo(api_url, _admin_key(), cfg)
        except KeyboardInterrupt as exc:
            _say(f"faultfleet: stopping ({exc or 'SIGINT'}): the API and the worker go down with the demo")
            raise
        finally:
            for proc in procs:
                _stop(proc)


def _api_server(host: str, port: int, verbose: bool) -> Any:
    """uvicorn's Server, minus its signal handling: uvicorn re-raises a caught SIGTERM after its
    shutdown, which killed `run` before it could stop the worker. `run` installs its own."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    config = uvicorn.Config(
        "app.main:app", host=host, port=port, log_level="info" if verbose else "warning", access_log=False
    )
    return Server(config)


@app.command("run")
def run(
    host: str = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="FAULTFLEET_PORT")] = 8000,
    concurrency: int = 2,
    demo: Annotated[bool, typer.Option("--demo", help="also run the demo against it once it is up")] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="show the worker's and the API's logs here, not in var/")
    ] = False,
    chips: ChipsOpt = 60,
    seed: SeedOpt = 7,
    out: OutOpt = None,
    exit_with_parent: Annotated[
        bool,
        typer.Option(
            "--exit-with-parent",
            help="stop (as on SIGTERM) when the process that started this one ends, however it ends (Linux); "
            "`make run` uses it: make passes only SIGTERM on to its recipe",
        ),
    ] = False,
) -> None:
    """Embedded quick start: migrate + one worker + the API; Ctrl-C (or SIGTERM, SIGHUP) stops both."""
    server = _api_server(host, port, verbose)
    stop_reason: list[str] = []

    def on_stop(sig: int, frame: Any) -> None:
        stop_reason.append(signal.Signals(sig).name)
        if len(stop_reason) > 1 and sig == signal.SIGINT:
            server.force_exit = True  # a second Ctrl-C: do not wait for open connections
        server.should_exit = True

    previous = {s: signal.signal(s, on_stop) for s in STOP_SIGNALS}
    if exit_with_parent:
        _exit_with_parent()  # after the handlers: the SIGTERM it may send stops the service cleanly
    worker_proc: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None
    try:
        migrate("head")
        settings = _settings()
        log_path = settings.var_dir / "worker.log"
        if not verbose:
            log = log_path.open("ab")
        if stop_reason:
            return
        worker_proc = _spawn(
            [sys.executable, "-m", "app.cli", "worker", "--loglevel", "INFO", "--concurrency", str(concurrency)], log
        )
        where = "here" if verbose else f"in {log_path} (--verbose shows them here)"
        url = f"http://{host}:{port}"
        _say(
            f"faultfleet: API on {url} (docs at /docs), worker pid {worker_proc.pid}, its logs {where}; "
            f"state in {settings.var_dir}; Ctrl-C stops both"
        )
        if demo:
            threading.Thread(target=_demo_thread, args=(url, _demo_config(chips, seed, out)), daemon=True).start()
        server.run()
    finally:
        if worker_proc is not None:
            _stop(worker_proc)
        if log is not None:
            log.close()
        for s, h in previous.items():
            signal.signal(s, h)
        if stop_reason:
            _say(f"faultfleet: stopped ({stop_reason[0]}); the API and the worker are down")


def _demo_thread(url: str, cfg: Any) -> None:
    from app.demo import run_demo

    try:
        _wait_ready(url)
        run_demo(url, _admin_key(), cfg)
        _say(f"faultfleet: demo done; the API stays up on {url} (Ctrl-C stops it)")
    except Exception as exc:
        _say(f"faultfleet: demo failed: {exc}")
