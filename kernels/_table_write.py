"""Writing tuning tables safely: atomic, serialized by a lock file, merging without loss; and the
two facts every file the tuner writes relies on: the output directory's pre-flight
(:func:`check_output_dir`, once per run) and the atomic replace (:func:`write_atomically`).

Every write of ``<dir>/<name>.json`` holds the lock ``<dir>/.<name>.json.lock`` (``filelock``)
around its read-merge-rename, so concurrent tuners, processes or machines sharing a directory
never lose each other's entries; readers take no lock (a rename is atomic: they see the old
file or the new one). Temporary files ``.<name>.json.<random>.tmp`` exist only while a writer
holds the lock, so one found by a lock holder was left by a dead writer and is removed.
"""

from __future__ import annotations

import datetime as _dt
import os
import secrets
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock
import orjson

from ._table_format import (
    RopeTableWarning,
    TableError,
    device_table_name,
    merge_tables,
    parse_table,
    salvage_table,
    validate_table,
)

__all__ = [
    "OutputDir",
    "TableTarget",
    "check_output_dir",
    "check_table_target",
    "existing_ancestor",
    "merge_into_table",
    "unwritable_reason",
    "write_atomically",
    "write_table",
]


# -- the output directory ------------------------------------------------------------------------


def existing_ancestor(path: Path) -> Path:
    """``path`` made absolute, or its nearest ancestor that exists."""
    path = path.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def unwritable_reason(directory: Path) -> str | None:
    """Why no file can be created in ``directory`` (None when one can). A file is created and
    removed, so permission bits, ACLs, immutable flags and read-only mounts all count."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


class OutputDir(str):
    """A directory that :func:`check_output_dir` found writable, or creatable (writers create
    it): the path as a string, which ``/`` joins as a :class:`~pathlib.Path` does.

    Passing it on (to :func:`autotune.tune`, :func:`check_table_target`) skips the check there:
    a command checks its output once, before any work. What ``/`` or :attr:`path` derive are
    plain paths, never taken as checked.
    """

    __slots__ = ()

    @property
    def path(self) -> Path:
        return Path(self)

    def __truediv__(self, other: str | os.PathLike) -> Path:
        return Path(self) / other


def check_output_dir(path: str | os.PathLike, flag: str = "output") -> OutputDir:
    """``path`` as a directory that exists or can be created, and is writable; writes nothing.
    An :class:`OutputDir` is returned as it is (it was checked).

    Args:
        path: The directory asked for.
        flag: The option or argument named in the error, e.g. ``"--output"``.

    Raises:
        ValueError: ``path`` is empty, a file, under a file, or not writable.
    """
    if isinstance(path, OutputDir):
        return path
    text = os.fspath(path)
    if not text.strip():
        raise ValueError(f"{flag}: expected a directory, got an empty string")
    directory = Path(text).expanduser()
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{flag}: {directory} is a file, not a directory")
    ancestor = existing_ancestor(directory)
    if not ancestor.is_dir():
        raise ValueError(f"{flag}: {directory} is under a file ({ancestor})")
    reason = unwritable_reason(ancestor)
    if reason is not None:
        raise ValueError(f"{flag}: {ancestor} is not writable ({reason}); choose another directory")
    return OutputDir(directory)


def write_atomically(path: str | os.PathLike, data: bytes) -> Path:
    """Replace ``path`` with ``data`` atomically: a temporary file ``.<name>.<random>.tmp``
    beside it, fsync, rename. Readers see the old file or the new one, never a part; on any
    failure the temporary file is removed and ``path`` is untouched. The file gets the
    process umask's permissions, as any file ``open()`` makes (tables and models are read by
    serving processes that may run as another user). The directory must exist.

    Raises:
        OSError: the directory cannot be written.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# -- tables --------------------------------------------------------------------------------------


@contextmanager
def _table_lock(path: Path) -> Iterator[None]:
    """Hold ``path``'s lock file and clear temporary files left by dead writers."""
    lock = filelock.FileLock(path.parent / f".{path.name}.lock")
    with lock:
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        yield


def _dump(table: Mapping[str, Any]) -> bytes:
    return orjson.dumps(table, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2) + b"\n"


def write_table(
    path: str | os.PathLike, table: Mapping[str, Any], known_providers: Iterable[str] | None = None
) -> Path:
    """Validate ``table`` and replace ``path`` with it atomically (temporary file, fsync, rename),
    sorted keys, under the table's lock.

    Raises:
        TableError: ``table`` is off the schema (nothing is written).
        OSError: the directory cannot be created or written.
    """
    validate_table(table, known_providers)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _table_lock(path):
        write_atomically(path, _dump(table))
    return path


@dataclass(frozen=True)
class TableTarget:
    """What merging into an existing table file would do (see :func:`check_table_target`).

    Attributes:
        path: The table file.
        exists: Whether it exists now.
        dropped: One line per entry a merge would drop as invalid (place and fault).
        unreadable: Why the whole file cannot be read (it would be kept aside as
            ``<name>.bad-<timestamp>``), or None.
    """

    path: Path
    exists: bool
    dropped: tuple[str, ...] = ()
    unreadable: str | None = None


def _inspect(path: Path, known_providers: Iterable[str] | None) -> tuple[dict | None, TableTarget]:
    """The valid part of the existing table at ``path`` (None when there is none or it is
    unreadable) and what a merge would do with it."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, TableTarget(path, exists=False)
    try:
        kept, dropped = salvage_table(parse_table(data, path), known_providers)
    except TableError as exc:
        fault = str(exc).removeprefix(f"{path}: ")
        return None, TableTarget(path, exists=True, unreadable=fault)
    return kept, TableTarget(path, exists=True, dropped=tuple(dropped))


def check_table_target(
    output_dir: str | os.PathLike,
    device_name: str,
    known_providers: Iterable[str] | None = None,
    flag: str = "output",
) -> TableTarget:
    """Pre-flight for a tuning run: can the table of ``device_name`` be written under
    ``output_dir`` (:func:`check_output_dir`, skipped for an :class:`OutputDir`), and what would
    merging into the existing file drop? Writes nothing.

    Call it before tuning, so that a bad output fails in a second, not after the measurements.

    Raises:
        ValueError: ``output_dir`` is empty, a file, under a file or not writable, or the
            table's path is a directory; the message starts with ``flag``.
    """
    directory = check_output_dir(output_dir, flag).path
    path = directory / device_table_name(device_name)
    if path.is_dir():
        raise ValueError(f"{flag}: {path} is a directory, not a table file")
    return _inspect(path, known_providers)[1]


def merge_into_table(
    path: str | os.PathLike, table: Mapping[str, Any], known_providers: Iterable[str] | None = None
) -> Path:
    """Merge ``table`` into the file at ``path`` (read, merge, atomic rename, all under the
    table's lock): each (mode, spec, bucket) of ``table`` replaces the file's entry, every other
    valid entry of the file is kept. Of two merges of one entry the later one wins.

    Invalid entries of the existing file are dropped with one :class:`RopeTableWarning` naming
    them. A file that cannot be read as a table at all (not JSON, another ``schema_version``) is
    never deleted: it is renamed to ``<name>.bad-<UTC timestamp>`` and the warning says so.

    Raises:
        TableError: ``table`` itself is off the schema (nothing is written).
        OSError: the directory cannot be created or written.
    """
    validate_table(table, known_providers)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _table_lock(path):
        old, target = _inspect(path, known_providers)
        if target.unreadable is not None:
            stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
            kept_as = path.with_name(f"{path.name}.bad-{stamp}")
            os.replace(path, kept_as)
            warnings.warn(
                f"rope-autotune: {path} is not a readable table ({target.unreadable}); kept it "
                f"as {kept_as} and wrote a new table",
                RopeTableWarning,
                stacklevel=2,
            )
        elif target.dropped:
            warnings.warn(
                f"rope-autotune: dropped {len(target.dropped)} invalid entries of {path} while "
                "merging: " + "; ".join(target.dropped),
                RopeTableWarning,
                stacklevel=2,
            )
        write_atomically(path, _dump(merge_tables(old, table)))
    return path
