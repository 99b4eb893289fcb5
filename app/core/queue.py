"""The API's handle on Celery: it publishes by task name only (see app.services.jobs).

The broker's health as this process last saw it: a failed publish or probe marks it down for
`broker_retry_after_s`, during which publishing is skipped at once (the job stays queued for
the recovery sweep) and job submissions answer 503, so a dead broker costs a request nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger("faultfleet.queue")

_lock = threading.Lock()
_down_until = 0.0
_last_error = ""


def get_celery() -> Any:
    from workers.celery_app import celery_app

    return celery_app


def broker_down() -> bool:
    """Whether a publish or probe failed within the last `broker_retry_after_s`."""
    return time.monotonic() < _down_until


def broker_failed(exc: BaseException) -> None:
    from app.core.config import get_settings

    global _down_until, _last_error
    with _lock:
        _down_until = time.monotonic() + get_settings().broker_retry_after_s
        _last_error = f"{type(exc).__name__}: {exc}"[:300]


def broker_ok() -> None:
    global _down_until
    _down_until = 0.0


def check_broker(timeout: float | None = None) -> None:
    """Raise if the configured broker cannot be reached (a fresh connection, bounded by `timeout`)."""
    from pathlib import Path

    from app.core.config import get_settings

    settings = get_settings()
    if settings.broker_is_filesystem:
        folder = Path(settings.broker_transport_options()["data_folder_in"])
        if not folder.is_dir():
            raise RuntimeError(f"broker folder {folder} missing")
        probe = folder / ".readyz"
        probe.write_bytes(b"")
        probe.unlink()
        return
    with get_celery().connection_for_write() as conn:
        conn.ensure_connection(
            max_retries=1, interval_start=0, interval_step=0, timeout=timeout or settings.broker_timeout_s
        )


def require_broker() -> None:
    """Before creating a job a client waits for: 503 + Retry-After while the broker is unreachable.

    Nothing is written then. If the broker fails after this check, the job is still accepted:
    it stays queued and the recovery sweep sends it when the broker is back.
    """
    from app.api.errors import ApiError
    from app.core.config import get_settings

    settings = get_settings()
    if not broker_down():
        try:
            check_broker()
            broker_ok()
            return
        except Exception as exc:
            broker_failed(exc)
            log.warning("broker unreachable: %s", exc)
    msg = f"job broker unavailable ({_last_error}): jobs cannot be queued now; retry later"
    raise ApiError(
        503, msg, [{"loc": ["broker"], "msg": msg}], headers={"Retry-After": str(settings.broker_retry_after_s)}
    )
