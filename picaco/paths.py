"""Where picaco keeps things on disk. Every location can be moved with an environment variable."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

CACHE_ENV = "PICACO_CACHE_DIR"
MODELS_ENV = "PICACO_MODELS_DIR"


def cache_dir() -> Path:
    """Root of picaco's cache: `$PICACO_CACHE_DIR`, else the user's cache dir (~/.cache/picaco)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("picaco"))


def models_dir() -> Path:
    """Verified model files: `$PICACO_MODELS_DIR`, else `<cache_dir>/models`."""
    env = os.environ.get(MODELS_ENV)
    return Path(env).expanduser() if env else cache_dir() / "models"


def calls_db_path() -> Path:
    """The SQLite cache of model calls."""
    return cache_dir() / "calls.sqlite"
