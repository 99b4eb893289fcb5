"""All service settings in one class; environment prefix ``FAULTFLEET_``.

Embedded default (no variables set): a SQLite file and a serverless Celery broker
(kombu's filesystem transport) under ``./var``. Scale-out: point
``FAULTFLEET_DATABASE_URL`` at ``postgresql+psycopg://...`` and ``FAULTFLEET_BROKER_URL`` at
``redis://...``. There is no Celery result backend: results live in the jobs table.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FAULTFLEET_", env_file=None, extra="ignore")

    # --- storage ---------------------------------------------------------------
    var_dir: Path = Field(default=Path("var"), description="Embedded default state: SQLite file, broker folders")
    database_url: str = Field(default="", description="SQLAlchemy URL; default sqlite:///<var_dir>/faultfleet.db")
    artifact_dir: Path | None = Field(default=None, description="Artifact store directory; default <var_dir>/artifacts")
    artifact_backend: Literal["local", "database"] = Field(
        default="local",
        description="Where model files live: 'local' (artifact_dir; share it between machines) or 'database' "
        "(chunks in the service database, so every worker that reaches PostgreSQL shares them, and running "
        "jobs' training checkpoints with them)",
    )
    max_upload_bytes: int = Field(default=256 << 20, description="Body limit (bytes) of POST /models uploads")
    db_pool_size: int = Field(
        default=40,
        description="Database connections kept per process: at least the request thread pool (40), so that "
        "concurrent requests never open and close overflow connections (a PostgreSQL backend start each)",
    )
    db_max_overflow: int = 10
    db_connect_timeout_s: float = Field(
        default=5.0, gt=0, description="PostgreSQL: give up connecting after this long (the request answers 503)"
    )
    db_busy_timeout_s: float = Field(
        default=30.0,
        ge=0,
        description="SQLite: wait this long for another writer's lock before answering 503 'database busy'",
    )
    db_retry_after_s: int = Field(
        default=5, ge=1, description="Retry-After (seconds) of a 503 answered while the database is unreachable"
    )
    db_ping_after_idle_s: float = Field(
        default=2.0,
        description="Ping a pooled connection at checkout when it was idle longer than this (replacing it if the "
        "server dropped it); 0 pings at every checkout",
    )

    # --- Celery ------------------------------------------------------------------
    broker_url: str = Field(default="", description="Celery broker; default filesystem:// under <var_dir>/broker")
    queue: str = Field(default="faultfleet", description="Celery queue name (one per installation / test session)")
    redis_key_prefix: str = Field(default="", description="Prefix of every Redis key the broker writes")
    broker_timeout_s: float = Field(
        default=2.0,
        gt=0,
        description="Connecting to, and publishing on, the broker gives up after this long (one quick retry)",
    )
    broker_retry_after_s: int = Field(
        default=5,
        ge=1,
        description="After a failed publish the broker counts as down this long: job submissions answer 503 "
        "with this Retry-After at once, and jobs created meanwhile stay queued for the sweep to send",
    )
    broker_visibility_timeout_s: int = Field(
        default=600, description="Redis: an unacked message is redelivered after this long (duplicates are harmless)"
    )
    broker_polling_interval_s: float = Field(default=0.2, description="Filesystem broker: poll interval")
    worker_concurrency: int | None = None
    worker_pool: str = "prefork"
    device: str = Field(
        default="cpu",
        pattern=r"^(cpu|auto|cuda(:\d+)?)$",
        description="Where workers run the emulated array (retraining, verification, screening): 'cpu', 'cuda', "
        "'cuda:N', or 'auto' (the GPU when torch sees one). Array outputs are the same integers on every device",
    )

    # --- jobs ----------------------------------------------------------------------
    job_heartbeat_s: float = Field(default=5.0, description="A running job's worker touches its row this often")
    job_stale_after_s: float = Field(default=30.0, description="A 'running' job with an older heartbeat is re-enqueued")
    job_requeue_queued_after_s: float = Field(
        default=120.0, description="A 'queued' job not picked up for this long is re-sent (lost message)"
    )
    job_sweep_interval_s: float = Field(default=10.0, description="How often each worker runs the recovery sweep")
    job_max_attempts: int = Field(default=5, description="A job claimed this many times without finishing fails")
    worker_stale_after_s: float = Field(
        default=60.0,
        description="/readyz reports 'no worker seen' when no worker process heart-beat for this long "
        "(workers beat at every sweep, job_sweep_interval_s)",
    )

    # --- API -------------------------------------------------------------------------
    api_keys: list[str] = Field(
        default_factory=list,
        description="Extra API keys accepted as 'scope:key' (e.g. 'admin:s3cret'); stored keys live hashed in the DB",
    )
    create_local_admin_key: bool | None = Field(
        default=None, description="Create an admin key file on first run; default on for SQLite, off otherwise"
    )
    max_body_bytes: int = Field(
        default=1 << 20, description="Body limit (bytes), all but bulk and multipart POST /models (JSON ones included)"
    )
    max_bulk_bytes: int = Field(default=64 << 20, description="Request body limit (bytes) of POST /chips/bulk")
    max_bulk_lines: int = Field(default=100_000, description="Most NDJSON lines per bulk request")
    max_faults_per_map: int = Field(
        default=100_000,
        ge=1,
        description="Most fault entries in one fault map (422 beyond; a 32x32 int8 array "
        "has 50,176 possible distinct faults)",
    )
    max_dataset_bytes: int = Field(
        default=256 << 20,
        ge=1,
        description="Most bytes the arrays of an uploaded .npz dataset take once "
        "decompressed (413 beyond; read from the npy headers before anything is inflated)",
    )
    max_dataset_elements: int = Field(
        default=64 << 20,
        ge=1,
        description="Most elements in the arrays of an uploaded .npz dataset (413 beyond; "
        "each becomes a float32 when loaded)",
    )
    max_weights_bytes: int = Field(
        default=256 << 20,
        ge=1,
        description="Most bytes an uploaded weights file takes once loaded: a .safetensors file's size, a .pt's "
        "zip members' uncompressed sizes (413 beyond; read from the zip directory before anything is inflated)",
    )
    ingest_rate_limit: str = Field(
        default="",
        description="Per-API-key ingestion limit in fault maps, e.g. '50/second;2000/minute': POST /chips costs 1, "
        "POST /chips/bulk one per line (429 with Retry-After beyond; a bulk costing more than a limit's whole "
        "amount: 413, split it); empty: no limit. Counted in Redis when Redis is the broker, else per process",
    )
    auth_cache_s: float = Field(default=30.0, description="How long a verified API key is cached in-process")
    page_size_max: int = 1000
    api_workers: int = Field(default=1, ge=1, description="uvicorn worker processes of `faultfleet serve`")

    @model_validator(mode="after")
    def _defaults(self) -> Settings:
        self.var_dir = self.var_dir.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.var_dir / 'faultfleet.db'}"
        if not self.broker_url:
            self.broker_url = "filesystem://"
        if self.artifact_dir is None:
            self.artifact_dir = self.var_dir / "artifacts"
        self.artifact_dir = self.artifact_dir.expanduser().resolve()
        if self.artifact_backend == "database" and self.is_sqlite:
            # On SQLite a blob write would wait on the writer lock of the caller's own transaction.
            raise ValueError("artifact_backend 'database' needs PostgreSQL; with SQLite use 'local' (artifact_dir)")
        if self.ingest_rate_limit:
            from limits import parse_many

            parse_many(self.ingest_rate_limit)  # ValueError naming the notation it cannot read
        if self.create_local_admin_key is None:
            self.create_local_admin_key = self.is_sqlite
        return self

    # --- derived ------------------------------------------------------------------------
    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def broker_is_filesystem(self) -> bool:
        return self.broker_url.startswith("filesystem")

    @property
    def broker_dir(self) -> Path:
        return self.var_dir / "broker"

    @property
    def local_admin_key_file(self) -> Path:
        return self.var_dir / "admin.key"

    def broker_transport_options(self) -> dict[str, Any]:
        if self.broker_is_filesystem:
            d = self.broker_dir
            return {
                "data_folder_in": str(d / "queue"),
                "data_folder_out": str(d / "queue"),
                "control_folder": str(d / "control"),
                "processed_folder": str(d / "processed"),
                "store_processed": False,
                "polling_interval": self.broker_polling_interval_s,
            }
        opts: dict[str, Any] = {
            "visibility_timeout": self.broker_visibility_timeout_s,
            # bounded waits on a dead or unreachable Redis (kombu passes these to redis-py)
            "socket_connect_timeout": self.broker_timeout_s,
            "socket_timeout": max(self.broker_timeout_s, 5.0),  # also bounds the worker's blocking reads
        }
        if self.redis_key_prefix and self.broker_url.startswith(("redis", "rediss")):
            opts["global_keyprefix"] = self.redis_key_prefix
        return opts

    def ensure_dirs(self) -> None:
        """Create the local folders the embedded default needs."""
        self.var_dir.mkdir(parents=True, exist_ok=True)
        assert self.artifact_dir is not None
        self.artifact_dir.mkdir(parents=True, exist_ok=True)
        if self.broker_is_filesystem:
            for key in ("data_folder_in", "control_folder", "processed_folder"):
                Path(self.broker_transport_options()[key]).mkdir(parents=True, exist_ok=True)


@lru_cache
def get_settings() -> Settings:
    return Settings()
