"""An atomic compare-and-set of one study system attribute, on every storage the tuner opens.

Optuna's storages set attributes unconditionally; :mod:`autotune.distributed` needs "set it if it
is still what I read" to decide which worker owns a study. Per storage kind:

* **RDB** (PostgreSQL, MySQL, SQLite): the database decides, in one statement on Optuna's
  ``study_system_attributes`` table: an ``UPDATE`` conditioned on the value read, or an
  ``INSERT`` that the table's unique (study, key) constraint refuses to all but the first.
* **Journal file**: the read and the append happen under a lock file beside the journal
  (``<journal>.claims.lock``; Optuna's open()-based lock, which works on network file systems
  as the journal's own lock does), which every compare-and-set on the journal takes.
* **In memory**: a lock of this process (such a storage lives in one process).
"""

from __future__ import annotations

import json
import threading
from typing import Any

import optuna
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

__all__ = ["compare_and_set"]

_IN_PROCESS = threading.Lock()


def compare_and_set(
    storage: optuna.storages.BaseStorage, study_id: int, key: str, expected: Any, new: Any
) -> bool:
    """Set study ``study_id``'s system attribute ``key`` to ``new`` if its value is ``expected``
    now (None: it is not set); whether it was set. Values are JSON, compared as decoded.

    Raises:
        ValueError: a storage of another kind (a gRPC proxy, a Redis journal...).
    """
    rdb = _rdb(storage)
    if rdb is not None:
        return _rdb_compare_and_set(rdb, study_id, key, expected, new)
    if isinstance(storage, optuna.storages.InMemoryStorage):
        with _IN_PROCESS:
            return _compare_then_set(storage, study_id, key, expected, new)
    path = _journal_file(storage)
    if path is None:
        raise ValueError(
            f"storage {type(storage).__name__}: claims need a journal file, a database (RDB) or "
            "an in-memory storage"
        )
    lock = JournalFileOpenLock(f"{path}.claims")
    lock.acquire()
    try:
        return _compare_then_set(storage, study_id, key, expected, new)
    finally:
        lock.release()


def _compare_then_set(
    storage: optuna.storages.BaseStorage, study_id: int, key: str, expected: Any, new: Any
) -> bool:
    """The compare-and-set for a caller holding the storage's lock (a journal reads the other
    processes' appends first)."""
    if storage.get_study_system_attrs(study_id).get(key) != expected:
        return False
    storage.set_study_system_attr(study_id, key, new)
    return True


def _rdb(storage: optuna.storages.BaseStorage) -> optuna.storages.RDBStorage | None:
    # optuna.storages.get_storage wraps an RDB storage in a cache (its private _backend).
    for candidate in (storage, getattr(storage, "_backend", None)):
        if isinstance(candidate, optuna.storages.RDBStorage):
            return candidate
    return None


def _journal_file(storage: optuna.storages.BaseStorage) -> str | None:
    # A journal storage does not expose its backend or the backend its path (both private).
    backend = getattr(storage, "_backend", None)
    if isinstance(storage, optuna.storages.JournalStorage) and isinstance(
        backend, JournalFileBackend
    ):
        return getattr(backend, "_file_path", None)
    return None


def _rdb_compare_and_set(
    storage: optuna.storages.RDBStorage, study_id: int, key: str, expected: Any, new: Any
) -> bool:
    import sqlalchemy as sa

    # The columns Optuna's RDB schema has kept since its first version; values are JSON text.
    attrs = sa.table(
        "study_system_attributes", sa.column("study_id"), sa.column("key"), sa.column("value_json")
    )
    this = sa.and_(attrs.c.study_id == study_id, attrs.c.key == key)
    with storage.engine.connect() as conn:
        current = conn.execute(sa.select(attrs.c.value_json).where(this)).scalar_one_or_none()
    if current is None:
        if expected is not None:
            return False
        try:
            with storage.engine.begin() as conn:
                conn.execute(
                    sa.insert(attrs).values(study_id=study_id, key=key, value_json=json.dumps(new))
                )
        except sa.exc.IntegrityError:  # another writer inserted first
            return False
        return True
    if json.loads(current) != expected:
        return False
    with storage.engine.begin() as conn:
        done = conn.execute(
            sa.update(attrs)
            .where(this, attrs.c.value_json == current)
            .values(value_json=json.dumps(new))
        )
    return done.rowcount == 1
