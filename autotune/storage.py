"""Opening the tuner's Optuna storage: a journal file (the default) or a database URL.

Every way a storage cannot be opened is one :class:`StorageError` whose one-line message names
the path or URL (password hidden) and the fix. A journal whose last record was torn by a crash
(a partial last line, or an undecodable last record) is repaired on open: cut back to its last
complete record, the original kept beside it as ``<name>.torn-<UTC timestamp>``, with a warning
naming both. Damage anywhere else is refused, naming the line and the fix.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path

import optuna

from kernels.table import existing_ancestor, unwritable_reason

__all__ = [
    "HEARTBEAT_GRACE_S",
    "HEARTBEAT_INTERVAL_S",
    "StorageError",
    "default_storage_path",
    "open_storage",
]

logger = logging.getLogger(__name__)

# Heartbeat for RDB storages (PostgreSQL, SQLite): a trial whose worker has been silent for the
# grace period is failed by the next worker that starts a trial in the study.
HEARTBEAT_INTERVAL_S = 10
HEARTBEAT_GRACE_S = 60
# Database URL schemes (SQLAlchemy dialects, before any ``+driver``) Optuna's RDB storage is
# documented and tested with.
_RDB_DIALECTS = frozenset({"sqlite", "postgresql", "postgres", "mysql", "mariadb"})
# How much of a journal's end is read at a time when looking for its last records.
_TAIL_CHUNK = 1 << 16
_EXAMPLES = "a journal file path like ./studies.journal or a URL like postgresql://user@host/db"


class StorageError(ValueError):
    """A storage that cannot be opened: a bad path or URL, a missing database driver, a
    read-only location, or a journal damaged beyond a torn last record.

    A ``ValueError`` (a bad argument), so callers that turn those into a usage error do so here
    too. The message is one line naming the path or URL and the fix.
    """


def default_storage_path() -> Path:
    """The journal file used when no storage is given (in the user cache directory)."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("rope-autotune")) / "studies.journal"


def open_storage(
    url: str | os.PathLike | None = None, *, create: bool = True
) -> optuna.storages.BaseStorage:
    """Open an Optuna storage.

    Args:
        url: ``postgresql://...``, ``mysql://...`` or ``sqlite:///...`` for Optuna's RDB storage
            (with a heartbeat, so trials of a dead worker are failed); a file path (optionally
            ``journal:PATH``) for a journal file; None for :func:`default_storage_path`.
        create: Create a journal file or SQLite database that does not exist yet (and its
            directory). False for readers such as ``export``: a path that does not exist is
            an error rather than a new, empty storage.

    Raises:
        StorageError: the storage cannot be opened (empty, a directory, under a file,
            read-only, an unknown URL scheme, no database driver, the database unreachable,
            no such file with ``create=False``, or a journal damaged other than at its end).
    """
    if url is None:
        return _open_journal(default_storage_path(), create=create)
    text = os.fspath(url) if isinstance(url, os.PathLike) else str(url)
    if not text.strip():
        raise StorageError(
            f"storage {text!r}: empty; give {_EXAMPLES}, or leave it out for "
            f"{default_storage_path()}"
        )
    if "://" in text:
        return _open_rdb(text, create=create)
    path = text.removeprefix("journal:")
    if not path.strip():
        raise StorageError(f"storage {text!r}: no path after journal:; give {_EXAMPLES}")
    return _open_journal(Path(path).expanduser(), create=create)


# -- databases -----------------------------------------------------------------------------------


def _open_rdb(url: str, *, create: bool) -> optuna.storages.RDBStorage:
    import sqlalchemy.engine
    import sqlalchemy.exc

    scheme = url.partition("://")[0].lower()
    dialect = scheme.partition("+")[0]
    if dialect not in _RDB_DIALECTS:
        raise StorageError(
            f"storage {url!r}: unknown scheme {scheme!r}; give {_EXAMPLES} "
            "(also mysql://... or sqlite:///path.db)"
        )
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError as exc:
        raise StorageError(
            f"storage {url!r}: not a database URL ({exc}); give {_EXAMPLES}"
        ) from None
    shown = parsed.render_as_string(hide_password=True)
    if dialect in ("postgresql", "postgres"):
        url = _with_postgres_driver(url, shown)
    if dialect == "sqlite" and parsed.database not in (None, "", ":memory:"):
        _check_sqlite_file(shown, Path(parsed.database).expanduser(), create=create)
    try:
        with warnings.catch_warnings():  # heartbeat_interval is "experimental" since Optuna 2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs={"pool_pre_ping": True},
                heartbeat_interval=HEARTBEAT_INTERVAL_S,
                grace_period=HEARTBEAT_GRACE_S,
            )
    except ImportError:
        raise StorageError(
            f"storage {shown!r}: no database driver for {scheme!r} is installed; install one "
            "(PostgreSQL: pip install psycopg2-binary; MySQL: pip install pymysql and use "
            "mysql+pymysql://...)"
        ) from None
    except sqlalchemy.exc.SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise StorageError(
            f"storage {shown!r}: cannot open the database ({reason}); check the URL, that the "
            "server runs and that the user may connect"
        ) from None


def _check_sqlite_file(shown: str, path: Path, *, create: bool) -> None:
    if path.is_dir():
        raise StorageError(
            f"storage {shown!r}: {path} is a directory; name a database file in it, e.g. "
            f"sqlite:///{path / 'studies.db'}"
        )
    if path.exists():
        if create:
            _check_writable_file(shown, path)
        return
    if not create:
        raise StorageError(
            f"storage {shown!r}: no such database file {path}; check the path (reading a "
            "storage never creates one)"
        )
    parent = existing_ancestor(path.parent)
    if parent != path.parent.resolve():
        raise StorageError(
            f"storage {shown!r}: directory {path.parent} does not exist; create it or choose "
            "another path"
        )
    _check_writable_dir(shown, parent)


def _with_postgres_driver(url: str, shown: str) -> str:
    """``postgresql://`` with a driver that is installed: SQLAlchemy 2.1 defaults to psycopg
    (3), while the test extra and many systems have psycopg2. A URL naming its driver
    (``postgresql+psycopg2://``) is kept.

    Raises:
        StorageError: neither psycopg nor psycopg2 is installed.
    """
    scheme, sep, rest = url.partition("://")
    if scheme.lower() not in ("postgresql", "postgres"):
        return url
    import importlib.util

    for module in ("psycopg", "psycopg2"):
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{module}{sep}{rest}"
    raise StorageError(
        f"storage {shown!r}: PostgreSQL needs a driver and none is installed; "
        "pip install psycopg2-binary (or psycopg)"
    )


# -- journal files -------------------------------------------------------------------------------


def _open_journal(path: Path, *, create: bool) -> optuna.storages.JournalStorage:
    shown = str(path)
    if path.is_dir():
        raise StorageError(
            f"storage {shown!r}: is a directory; name a journal file in it, e.g. "
            f"{path / 'studies.journal'}"
        )
    ancestor = existing_ancestor(path.parent)
    if not ancestor.is_dir():
        raise StorageError(
            f"storage {shown!r}: {ancestor} is a file, not a directory; choose a path under a "
            "directory"
        )
    if not path.exists():
        if not create:
            raise StorageError(
                f"storage {shown!r}: no such journal file; check the path (reading a storage "
                "never creates one)"
            )
        _check_writable_dir(shown, ancestor)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"storage {shown!r}: cannot create its directory ({exc})") from None
    elif create:
        _check_writable_file(shown, path)
    # Appends take a lock file beside the journal: the directory must be writable too.
    if create:
        _check_writable_dir(shown, path.parent)
    # The open()-based lock works on any file system; the default symlink lock needs symlinks.
    lock = optuna.storages.journal.JournalFileOpenLock(str(path))
    try:
        if path.exists() and _torn_tail_start(path) is not None:
            _repair_torn_tail(path, lock, writable=create)
        return optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(path), lock_obj=lock)
        )
    except StorageError:
        raise
    except OSError as exc:
        raise StorageError(f"storage {shown!r}: cannot read the journal ({exc})") from None
    except Exception as exc:  # the replay of a damaged journal: name the line and the fix
        raise _damaged(path, exc) from None


def _check_writable_dir(shown: str, directory: Path) -> None:
    reason = unwritable_reason(directory)
    if reason is not None:
        raise StorageError(
            f"storage {shown!r}: directory {directory} is not writable ({reason}); choose a "
            "writable location"
        )


def _check_writable_file(shown: str, path: Path) -> None:
    try:
        with open(path, "ab"):
            pass
    except OSError as exc:
        raise StorageError(
            f"storage {shown!r}: the file is not writable ({exc.strerror}); fix its permissions "
            "or choose a writable location"
        ) from None


def _decodes(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


def _torn_tail_start(path: Path) -> int | None:
    """The byte offset where a torn last record starts, or None when the journal ends with a
    complete record (or is empty).

    Torn: bytes after the last newline (a write cut short), or a last line that does not
    decode (a record whose end never reached the disk). Only the end of the file is read.
    """
    size = path.stat().st_size
    if size == 0:
        return None
    with open(path, "rb") as f:
        chunk = _TAIL_CHUNK
        while True:
            start = max(0, size - chunk)
            f.seek(start)
            data = f.read(size - start)
            # The last line's start must be inside ``data`` (or ``data`` is the whole file).
            body = data[:-1] if data.endswith(b"\n") else data
            cut = body.rfind(b"\n")
            if cut >= 0 or start == 0:
                break
            chunk *= 4
    line_start = start + cut + 1
    if not data.endswith(b"\n"):
        return line_start
    return None if _decodes(data[cut + 1 :]) else line_start


def _repair_torn_tail(
    path: Path, lock: optuna.storages.journal.JournalFileOpenLock, *, writable: bool
) -> None:
    """Cut the journal back to its last complete record, keeping the original beside it."""
    if not writable:
        # Optuna skips an unterminated or undecodable last line when reading, so a reader
        # sees the complete records; the next writer repairs the file.
        logger.warning(
            "storage %s: its last record is torn (a crash during a write); reading the complete "
            "records before it; the next tuning run on it repairs the file",
            path,
        )
        return
    lock.acquire()  # a writer in the middle of an append finishes first
    try:
        cut = _torn_tail_start(path)
        if cut is None:
            return
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        backup = path.with_name(f"{path.name}.torn-{stamp}")
        n = 1
        while backup.exists():
            n += 1
            backup = path.with_name(f"{path.name}.torn-{stamp}-{n}")
        torn = path.stat().st_size - cut
        try:
            shutil.copy2(path, backup)
            with open(path, "r+b") as f:
                f.truncate(cut)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise StorageError(
                f"storage {str(path)!r}: its last record is torn and the repair failed ({exc}); "
                f"keep a copy, then cut the file to its first {cut} bytes "
                f"(truncate -s {cut} {path})"
            ) from None
    finally:
        lock.release()
    logger.warning(
        "storage %s: its last record was torn (a crash during a write): cut the %d bytes after "
        "the last complete record; the original is kept as %s",
        path,
        torn,
        backup,
    )


def _damaged(path: Path, exc: Exception) -> StorageError:
    """The error for a journal that Optuna cannot replay, naming the first bad line."""
    bad = None
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.endswith(b"\n") or not _decodes(line):
                bad = number
                break
    if bad is None:
        where = f"cannot be replayed ({type(exc).__name__}: {exc})"
        keep = "or restore a copy"
    else:
        where = f"is damaged at line {bad}, not only at its end"
        keep = (
            f"or keep the {bad - 1} records before that line "
            f"(head -n {bad - 1} {path} > {path}.fixed && mv {path}.fixed {path})"
        )
    return StorageError(
        f"storage {str(path)!r}: the journal {where}; it cannot be repaired automatically: "
        f"move it aside to start afresh, {keep}"
    )
