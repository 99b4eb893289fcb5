from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings, get_settings


def make_engine(settings: Settings) -> Engine:
    url = settings.database_url
    if url.startswith("sqlite"):
        db_file = make_url(url).database
        if db_file and db_file != ":memory:" and not db_file.startswith("file:"):
            Path(db_file).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": settings.db_busy_timeout_s})
        busy_ms = int(settings.db_busy_timeout_s * 1000)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _rec: Any) -> None:
            # WAL: the API and the worker processes read while one writes.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={busy_ms}")
            cur.close()
            # Let SQLAlchemy own transactions and take the write lock up front: a deferred
            # transaction that upgrades to a writer in WAL mode fails with SQLITE_BUSY
            # immediately instead of waiting for busy_timeout.
            dbapi_conn.isolation_level = None

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    engine = create_engine(
        url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_pre_ping=settings.db_ping_after_idle_s <= 0,
        connect_args={"connect_timeout": max(1, round(settings.db_connect_timeout_s))},
    )
    if settings.db_ping_after_idle_s > 0:
        _ping_after_idle(engine, settings.db_ping_after_idle_s)
    return engine


_CHECKED_IN = "faultfleet_checked_in_at"


def _ping_after_idle(engine: Engine, idle_s: float) -> None:
    """Pessimistic disconnect handling where it pays: a pooled connection that sat idle for more
    than `idle_s` is pinged at checkout, and replaced if the server dropped it (a database
    restart, an idle timeout). One in steady use is not: under load a ping per checkout is a
    round trip and a quarter of the API's CPU on a short request. A connection that breaks
    while in use fails its statement; SQLAlchemy then invalidates the whole pool."""

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn: Any, record: Any) -> None:
        if record is not None:
            record.info[_CHECKED_IN] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        last = record.info.get(_CHECKED_IN)  # none on a connection opened just now
        if last is None or time.monotonic() - last <= idle_s:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:
            if engine.dialect.is_disconnect(cast(Any, exc), dbapi_conn, None):
                raise DisconnectionError(str(exc)) from exc  # the pool reconnects and retries
            raise


@lru_cache
def get_engine() -> Engine:
    return make_engine(get_settings())


@lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(get_engine(), expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    with get_sessionmaker()() as s:
        try:
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise
