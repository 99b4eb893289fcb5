"""The Celery app. Same code for the embedded default (filesystem broker) and scale-out (Redis).

Run a worker with ``faultfleet worker`` (or ``celery -A workers.celery_app worker``).
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

from celery import Celery, signals

from app.core.config import Settings, get_settings

log = logging.getLogger("faultfleet.worker")


def create_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    settings.ensure_dirs()
    app = Celery(
        "faultfleet",
        broker=settings.broker_url,
        backend=settings.result_backend,
        include=["workers.tasks", "workers.fleet"],
    )
    conf: dict[str, Any] = {
        "task_default_queue": settings.queue,
        "task_default_exchange": settings.queue,
        "task_default_routing_key": settings.queue,
        "task_acks_late": True,  # a task is acknowledged only after it ran ...
        "task_reject_on_worker_lost": True,  # ... and requeued if its pool process died
        "worker_prefetch_multiplier": 1,  # long tasks: do not hoard messages
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,  # results live in the jobs table
        "broker_transport_options": settings.broker_transport_options(),
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "enable_utc": True,
    }
    if settings.redis_key_prefix and settings.result_backend.startswith(("redis", "rediss")):
        conf["result_backend_transport_options"] = {"global_keyprefix": settings.redis_key_prefix}
    if settings.broker_is_filesystem:
        # No server, so no broadcast mailbox worth having: remote control off.
        conf["worker_enable_remote_control"] = False
    if settings.worker_concurrency:
        conf["worker_concurrency"] = settings.worker_concurrency
    app.conf.update(conf)
    return app


celery_app = create_celery()
app = celery_app  # `celery -A workers.celery_app` finds it


# --- recovery: the jobs table is the source of truth ---------------------------------------
_sweeper_started = threading.Event()


def _sweep_loop(stop: threading.Event, nodename: str) -> None:
    from app.db.session import get_engine
    from app.services.jobs import sweep

    settings = get_settings()
    first = True
    while not stop.is_set():
        try:
            sweep(get_engine(), settings, celery_app, dead_worker=nodename if first else None)
            first = False
        except Exception:
            log.warning("recovery sweep failed; retrying", exc_info=True)
        stop.wait(settings.job_sweep_interval_s)


_stop = threading.Event()


@signals.worker_ready.connect
def _start_sweeper(sender: Any = None, **_kw: Any) -> None:
    """On start, re-enqueue jobs this node left behind, then sweep for lost jobs periodically."""
    if _sweeper_started.is_set():
        return
    _sweeper_started.set()
    nodename = getattr(sender, "hostname", None) or f"celery@{socket.gethostname()}"
    threading.Thread(target=_sweep_loop, args=(_stop, nodename), name="faultfleet-sweeper", daemon=True).start()


@signals.worker_shutdown.connect
def _stop_sweeper(**_kw: Any) -> None:
    _stop.set()


@signals.worker_process_init.connect
def _fresh_engine_after_fork(**_kw: Any) -> None:
    """Prefork children must not share the parent's database connections."""
    from app.db.session import get_engine

    get_engine().dispose(close=False)
