"""``faultfleet migrate | serve | worker | keys create | run | demo``."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.core.config import Settings


def _settings() -> Settings:
    from app.core.config import get_settings

    return get_settings()


def cmd_migrate(args: argparse.Namespace) -> int:
    from app.db import migrate

    settings = _settings()
    settings.ensure_dirs()
    migrate.upgrade(settings.database_url, args.revision)
    print(f"database migrated to {args.revision}: {_redact(settings.database_url)}", file=sys.stderr)
    if settings.create_local_admin_key:
        _local_admin_key()
    return 0


def _local_admin_key() -> None:
    from app.db.session import session_scope
    from app.services.keys import ensure_local_admin_key

    settings = _settings()
    with session_scope() as s:
        created = ensure_local_admin_key(s, settings)
    path = settings.local_admin_key_file
    if created:
        print(f"created a local admin API key in {path} (send it as 'Authorization: Bearer <key>')", file=sys.stderr)
    else:
        print(f"local admin API key: {path}", file=sys.stderr)


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    uvicorn.run(
        "app.main:app",
        host=args.host,
        port=args.port,
        workers=args.workers or _settings().api_workers,
        log_level=args.log_level,
        access_log=not args.no_access_log,
    )
    return 0


def _worker_argv(args: argparse.Namespace) -> list[str]:
    settings = _settings()
    argv = ["worker", "--loglevel", args.loglevel, "-Q", settings.queue]
    pool = args.pool or settings.worker_pool
    argv += ["--pool", pool]
    concurrency = args.concurrency or settings.worker_concurrency
    if concurrency:
        argv += ["--concurrency", str(concurrency)]
    if args.hostname:
        argv += ["--hostname", args.hostname]
    if settings.broker_is_filesystem:
        argv += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    return argv


def cmd_worker(args: argparse.Namespace) -> int:
    from workers.celery_app import celery_app

    celery_app.worker_main(_worker_argv(args))
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    from app.db.session import session_scope
    from app.services.keys import create_key

    scopes: list[str] = [s for group in args.scope for s in group.replace(",", " ").split()]
    try:
        with session_scope() as s:
            key, row = create_key(s, scopes, name=args.name or "")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(key)
    print(f"created key {row.prefix}... with scope(s) {row.scopes}; it is shown only once", file=sys.stderr)
    return 0


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


def _demo_config(args: argparse.Namespace) -> object:
    from pathlib import Path

    from app.demo import DemoConfig

    return DemoConfig(chips=args.chips, seed=args.seed, out_dir=Path(args.out or _settings().var_dir / "demo"))


def _admin_key() -> str:
    key = os.environ.get("FAULTFLEET_API_KEY")
    if key:
        return key
    path = _settings().local_admin_key_file
    if not path.exists():
        raise SystemExit(f"no API key: set FAULTFLEET_API_KEY or run 'faultfleet migrate' to create {path}")
    return path.read_text().strip()


def cmd_demo(args: argparse.Namespace) -> int:
    """The demo against --url, or against an embedded stack (migrate, worker, API) it starts and stops."""
    from app.demo import DemoConfig, run_demo

    cfg = _demo_config(args)
    assert isinstance(cfg, DemoConfig)
    if args.url:
        run_demo(args.url.rstrip("/"), _admin_key(), cfg)
        return 0
    rc = cmd_migrate(argparse.Namespace(revision="head"))
    if rc:
        return rc
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(_settings().var_dir / "demo-services.log", "ab")  # noqa: SIM115 (closed below)
    argv = [sys.executable, "-m", "app.cli"]
    procs = [
        subprocess.Popen([*argv, "worker", "--loglevel", "WARNING", "--concurrency", "2"], stdout=log, stderr=log),
        subprocess.Popen(
            [*argv, "serve", "--port", str(port), "--log-level", "warning", "--no-access-log"], stdout=log, stderr=log
        ),
    ]
    print(f"faultfleet: embedded worker and API on {url}; their logs go to {log.name}", file=sys.stderr)
    try:
        _wait_ready(url)
        run_demo(url, _admin_key(), cfg)
    finally:
        for proc in procs:
            _stop(proc)
        log.close()
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from app.db.models import ApiKey
    from app.db.session import session_scope

    with session_scope() as s:
        for k in s.scalars(select(ApiKey).order_by(ApiKey.id)):
            state = f"revoked {k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "active"
            print(f"{k.prefix}...\t{k.scopes}\t{state}\t{k.name}")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from sqlalchemy import update

    from app.db.base import utcnow
    from app.db.models import ApiKey
    from app.db.session import session_scope

    prefix = args.prefix.rstrip(".")
    with session_scope() as s:
        n = s.execute(
            update(ApiKey).where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow())
        ).rowcount  # type: ignore[attr-defined]
    if not n:
        print(f"error: no active key with prefix {prefix!r}", file=sys.stderr)
        return 1
    print(f"revoked {n} key(s) {prefix}...; API processes stop accepting it within FAULTFLEET_AUTH_CACHE_S")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Embedded quick start: migrate, one worker subprocess, uvicorn in this process (and the demo)."""
    rc = cmd_migrate(argparse.Namespace(revision="head"))
    if rc:
        return rc
    settings = _settings()
    worker = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "worker", "--loglevel", "INFO", "--concurrency", str(args.concurrency)],
        env=os.environ.copy(),
    )
    print(
        f"faultfleet: API on http://{args.host}:{args.port} (docs at /docs), worker pid {worker.pid}, "
        f"state in {settings.var_dir}; Ctrl-C stops both",
        file=sys.stderr,
    )
    if args.demo:
        import threading

        from app.demo import DemoConfig, run_demo

        cfg = _demo_config(args)
        assert isinstance(cfg, DemoConfig)
        url = f"http://{args.host}:{args.port}"

        def demo() -> None:
            try:
                _wait_ready(url)
                run_demo(url, _admin_key(), cfg)
                print(f"faultfleet: demo done; the API stays up on {url} (Ctrl-C stops it)", file=sys.stderr)
            except Exception as exc:
                print(f"faultfleet: demo failed: {exc}", file=sys.stderr)

        threading.Thread(target=demo, name="demo", daemon=True).start()
    try:
        import uvicorn

        uvicorn.run("app.main:app", host=args.host, port=args.port, log_level="info", access_log=False)
    finally:
        _stop(worker)
    return 0


def _stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)  # Celery: warm shutdown (finish the current task)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if proc.poll() is None:
        proc.kill()  # a job it was running is recovered by the next worker's sweep
        proc.wait()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="faultfleet", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("migrate", help="apply the Alembic migrations to the configured database")
    m.add_argument("revision", nargs="?", default="head")
    m.set_defaults(fn=cmd_migrate)

    s = sub.add_parser("serve", help="run the API (uvicorn)")
    s.add_argument("--host", default=os.environ.get("FAULTFLEET_HOST", "127.0.0.1"))
    s.add_argument("--port", type=int, default=int(os.environ.get("FAULTFLEET_PORT", "8000")))
    s.add_argument("--workers", type=int, default=None, help="uvicorn processes (default FAULTFLEET_API_WORKERS or 1)")
    s.add_argument("--log-level", default="info")
    s.add_argument("--no-access-log", action="store_true")
    s.set_defaults(fn=cmd_serve)

    w = sub.add_parser("worker", help="run a Celery worker on the configured broker")
    w.add_argument("--concurrency", type=int, default=None)
    w.add_argument("--pool", default=None, help="prefork (default), threads or solo")
    w.add_argument("--hostname", default=None, help="Celery node name, e.g. w1@%%h")
    w.add_argument("--loglevel", default="INFO")
    w.set_defaults(fn=cmd_worker)

    k = sub.add_parser("keys", help="API keys")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    kc = ksub.add_parser("create", help="create an API key and print it (shown once)")
    kc.add_argument("--scope", action="append", required=True, help="ingest, plan, read or admin (repeatable)")
    kc.add_argument("--name", default="")
    kc.set_defaults(fn=cmd_keys_create)
    ksub.add_parser("list", help="list keys (prefix, scopes, state; never the key)").set_defaults(fn=cmd_keys_list)
    kr = ksub.add_parser("revoke", help="revoke the key with this prefix (as `keys list` shows it)")
    kr.add_argument("prefix")
    kr.set_defaults(fn=cmd_keys_revoke)

    r = sub.add_parser("run", help="embedded quick start: migrate + worker + API; Ctrl-C stops both")
    r.add_argument("--host", default="127.0.0.1")
    r.add_argument("--port", type=int, default=int(os.environ.get("FAULTFLEET_PORT", "8000")))
    r.add_argument("--concurrency", type=int, default=2)
    r.add_argument("--demo", action="store_true", help="also run the demo against it once it is up")
    _demo_args(r)
    r.set_defaults(fn=cmd_run)

    d = sub.add_parser(
        "demo", help="a generated fleet through the whole service (starts an embedded one without --url)"
    )
    d.add_argument("--url", default=None, help="a running faultfleet API (key from FAULTFLEET_API_KEY)")
    _demo_args(d)
    d.set_defaults(fn=cmd_demo)
    return p


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chips", type=int, default=60, help="fleet size (demo)")
    p.add_argument("--seed", type=int, default=7, help="fleet generator seed (demo)")
    p.add_argument("--out", default=None, help="download folder (demo; default <var_dir>/demo)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
