"""Opening the tuner's Optuna storage: a journal file, or an RDB (PostgreSQL, SQLite)."""

from __future__ import annotations

import os
from pathlib import Path

import optuna

__all__ = ["default_storage_path", "open_storage"]

# Heartbeat for RDB storages (PostgreSQL, SQLite): a trial whose worker has been silent for the
# grace period is failed by the next worker that starts a trial in the study.
HEARTBEAT_INTERVAL_S = 10
HEARTBEAT_GRACE_S = 60


def default_storage_path() -> Path:
    """The journal file used when no ``--storage`` is given (in the user cache directory)."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("rope-autotune")) / "studies.journal"


def open_storage(url: str | os.PathLike | None = None) -> optuna.storages.BaseStorage:
    """Open an Optuna storage.

    Args:
        url: ``postgresql://...``, ``mysql://...`` or ``sqlite:///...`` for Optuna's RDB storage
            (with a heartbeat, so trials of a dead worker are failed); a file path (optionally
            ``journal:PATH``) for a journal file; None for :func:`default_storage_path`.
    """
    if url is not None and "://" in str(url):
        import warnings

        with warnings.catch_warnings():  # heartbeat_interval is "experimental" since Optuna 2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                _with_postgres_driver(str(url)),
                engine_kwargs={"pool_pre_ping": True},
                heartbeat_interval=HEARTBEAT_INTERVAL_S,
                grace_period=HEARTBEAT_GRACE_S,
            )
    path = Path(str(url).removeprefix("journal:")) if url is not None else default_storage_path()
    path = path.expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    # The open()-based lock works on any file system; the default symlink lock needs symlinks.
    lock = optuna.storages.journal.JournalFileOpenLock(str(path))
    return optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(path), lock_obj=lock)
    )


def _with_postgres_driver(url: str) -> str:
    """``postgresql://`` with a driver that is installed: SQLAlchemy 2.1 defaults to psycopg
    (3), while the test extra and many systems have psycopg2."""
    scheme, sep, rest = url.partition("://")
    if scheme not in ("postgresql", "postgres"):
        return url
    import importlib.util

    for module, driver in (("psycopg", "psycopg"), ("psycopg2", "psycopg2")):
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{driver}{sep}{rest}"
    return url
