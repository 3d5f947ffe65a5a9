"""Alembic migrations, shipped inside the package so the runtime image can apply them.

Run them as a release step, before new code serves: `python -m <package> migrate`
(or `alembic upgrade head`). The app itself never creates or alters tables.
"""

from pathlib import Path

from alembic import command
from alembic.config import Config

SCRIPT_LOCATION = Path(__file__).resolve().parent


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    config.attributes["database_url"] = database_url
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)
