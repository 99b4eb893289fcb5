"""Run Alembic from code: finds migrations/ from the installed package, so it works from any cwd."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config


def script_dir() -> Path:
    """migrations/ as installed next to app/ (works for regular, editable and namespace installs)."""
    import migrations

    for entry in migrations.__path__:
        if (Path(entry) / "env.py").is_file():
            return Path(entry)
    raise RuntimeError(f"migrations/env.py not found in {list(migrations.__path__)}")


def alembic_config(database_url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(script_dir()))
    if database_url:
        cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def upgrade(database_url: str | None = None, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str | None = None, revision: str = "base") -> None:
    command.downgrade(alembic_config(database_url), revision)
