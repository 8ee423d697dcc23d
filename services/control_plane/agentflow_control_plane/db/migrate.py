"""Running Alembic migrations programmatically (``agentflow migrate``)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

import agentflow_control_plane


def migrations_dir() -> Path:
    """The packaged migrations (wheel) or the repository's ``migrations/`` (checkout)."""
    packaged = Path(agentflow_control_plane.__file__).parent / "migrations"
    if (packaged / "env.py").exists():
        return packaged
    repo = Path(agentflow_control_plane.__file__).resolve().parents[3] / "migrations"
    if (repo / "env.py").exists():
        return repo
    raise FileNotFoundError("Alembic migrations not found in the package or the repository")


def alembic_config(database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    # Alembic's ini interpolation treats % specially.
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)
