"""The API's handle on Celery: it publishes by task name only (see app.services.jobs)."""

from __future__ import annotations

from typing import Any


def get_celery() -> Any:
    from workers.celery_app import celery_app

    return celery_app


def check_broker(timeout: float = 2.0) -> None:
    """Raise if the configured broker cannot be reached."""
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
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=timeout)
