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
        # No result backend: results and progress live in the jobs table, and a backend would
        # be one more server that every publish subscribes to (and stalls on when it is down).
        backend=None,
        include=["workers.tasks", "workers.handlers"],
    )
    conf: dict[str, Any] = {
        "task_default_queue": settings.queue,
        "task_default_exchange": settings.queue,
        "task_default_routing_key": settings.queue,
        "task_acks_late": True,  # a task is acknowledged only after it ran ...
        "task_reject_on_worker_lost": True,  # ... and requeued if its pool process died
        "worker_prefetch_multiplier": 1,  # long tasks: do not hoard messages
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,  # results live in the jobs table
        "broker_transport_options": settings.broker_transport_options(),
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": settings.broker_timeout_s,  # bounded connects when publishing
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "enable_utc": True,
    }
    if settings.broker_is_filesystem:
        conf["broker_transport"] = "workers.broker:Transport"  # atomic message files
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
    """Heart-beat this worker process, and sweep for lost jobs, every `job_sweep_interval_s`.

    Each round also probes the broker: when it comes back after being seen down, every queued
    job is sent again at once (a restarted Redis without persistence lost its messages)."""
    from app.core.queue import broker_failed, broker_ok, check_broker
    from app.db.base import utcnow
    from app.db.session import get_engine
    from app.services.jobs import sweep, worker_heartbeat

    settings = get_settings()
    started_at = utcnow()
    broker_was_down = False
    while not stop.is_set():
        try:
            worker_heartbeat(get_engine(), nodename, started_at)
        except Exception:
            log.warning("worker heartbeat failed; retrying", exc_info=True)
        try:
            check_broker()
            broker_ok()
            came_back, broker_was_down = broker_was_down, False
        except Exception as exc:
            broker_failed(exc)
            came_back, broker_was_down = False, True
            log.warning("broker unreachable: %s", exc)
        try:
            sweep(get_engine(), settings, celery_app, resend_all_queued=came_back)
        except Exception:
            log.warning("recovery sweep failed; retrying", exc_info=True)
        stop.wait(settings.job_sweep_interval_s)
    try:
        from app.services.jobs import worker_stopped

        worker_stopped(get_engine(), nodename)
    except Exception:
        log.warning("could not record this worker's stop", exc_info=True)


_stop = threading.Event()
_sweeper: threading.Thread | None = None


@signals.worker_ready.connect
def _start_sweeper(sender: Any = None, **_kw: Any) -> None:
    """On start, re-enqueue the jobs of dead processes, then heart-beat and sweep periodically."""
    global _sweeper
    if _sweeper_started.is_set():
        return
    _sweeper_started.set()
    nodename = getattr(sender, "hostname", None) or f"celery@{socket.gethostname()}"
    _sweeper = threading.Thread(target=_sweep_loop, args=(_stop, nodename), name="faultfleet-sweeper", daemon=True)
    _sweeper.start()


@signals.worker_shutdown.connect
def _stop_sweeper(**_kw: Any) -> None:
    _stop.set()
    if _sweeper is not None:
        _sweeper.join(timeout=5)  # let it record the stop


@signals.worker_process_init.connect
def _fresh_engine_after_fork(**_kw: Any) -> None:
    """Prefork children must not share the parent's database connections."""
    from app.db.session import get_engine

    get_engine().dispose(close=False)
