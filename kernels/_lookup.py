"""Finding and reading this device's tuning tables for ``select_rope``.

The file named after the device (``NVIDIA H200`` -> ``NVIDIA_H200.json``) in each directory of
:func:`kernels.table.table_search_path` (or the one ``table_dir`` given), in order; a bad file
is skipped with one :class:`~kernels.table.RopeTableWarning`, a stale one (other library
versions) is used with one. In a timing mode's entries: the exact spec in the first table that
has it, else the nearest spec (:func:`nearest_spec_key`) in the first table that has one.

Without a table of its own, a GPU may use another device's (:func:`transferred_tables`): every
table and model file in the same directories is a candidate (:func:`device_files`), chosen by
:func:`kernels.transfer.choose_device` on the files' metadata.
"""

from __future__ import annotations

import logging
import math
import threading
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson
import torch

from . import table as _table  # module attributes: tests redirect the search path
from ._spec import RopeSpec
from .providers import provider_names
from .table import RopeTableWarning, TableError, read_table
from .transfer import DeviceTraits, TransferChoice, choose_device

__all__ = [
    "device_files",
    "device_name",
    "device_traits",
    "find_entries",
    "nearest_spec_key",
    "read_tables",
    "search_directories",
    "table_files",
    "transferred_tables",
    "warn_if_stale",
    "warn_once",
]

logger = logging.getLogger(__name__)

# Library versions compared with a table's metadata: the ones its measurements depend on.
_VERSIONED_LIBRARIES = ("torch", "triton", "cuda", "flashinfer", "vllm")

_warned: set[tuple[str, ...]] = set()
_warned_lock = threading.Lock()


def warn_once(key: tuple[str, ...], message: str, stacklevel: int) -> None:
    """Warn once per process for ``key`` (a serving stack builds many selectors).

    ``stacklevel`` counts from the caller of this function up to ``select_rope``'s caller.
    """
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(message, RopeTableWarning, stacklevel=stacklevel + 1)


def device_name(device: torch.device) -> str:
    """The name a device's table is filed under (``NVIDIA H200``, ``CPU x86_64``)."""
    return _table.hardware_metadata(device)["device_name"]


def device_traits(device: torch.device) -> DeviceTraits:
    """This device as the transfer rule sees it (:func:`kernels.table.hardware_metadata`)."""
    return DeviceTraits.from_metadata(_table.hardware_metadata(device))


def table_files(table_dir: str | Path | None, file_name: str) -> list[Path]:
    """``table_dir``'s table (or the ``.json`` file it names), else ``file_name`` in every
    directory of the search path, in order."""
    if table_dir is not None:
        path = Path(table_dir).expanduser()
        return [path if path.suffix == ".json" else path / file_name]
    return [directory / file_name for directory in _table.table_search_path()]


def search_directories(table_dir: str | Path | None) -> list[Path]:
    """The directories whose files may be another device's data: ``table_dir`` (the directory
    of the ``.json`` file it names), else the search path."""
    if table_dir is not None:
        path = Path(table_dir).expanduser()
        return [path.parent if path.suffix == ".json" else path]
    return _table.table_search_path()


# Traits of data files by (path, modification time, size): selections repeat the scan.
_traits: dict[tuple[str, int, int], DeviceTraits | None] = {}
_traits_lock = threading.Lock()


def _file_traits(path: Path) -> DeviceTraits | None:
    try:
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        with _traits_lock:
            if key in _traits:
                return _traits[key]
        metadata = orjson.loads(path.read_bytes()).get("metadata")
        traits = DeviceTraits.from_metadata(metadata) if isinstance(metadata, dict) else None
    except Exception as exc:  # OSError, JSON, not an object: not a candidate, never an error
        logger.debug("%s: not a transfer candidate (%r)", path, exc)
        return None
    with _traits_lock:
        _traits[key] = traits
    return traits


def device_files(directories: Iterable[Path], kind: str) -> list[tuple[Path, DeviceTraits]]:
    """Every ``kind`` file (``"table"``: ``*.json``; ``"model"``: ``*.model.json``) in
    ``directories`` with a readable metadata header and its device's traits, in directory
    order, then by file name; hidden files (writers' temporaries) left out."""
    if kind not in ("table", "model"):
        raise ValueError(f"kind: expected 'table' or 'model', got {kind!r}")
    found = []
    for directory in directories:
        try:
            names = sorted(p for p in directory.glob("*.json") if not p.name.startswith("."))
        except OSError:
            continue
        for path in names:
            if path.name.endswith(".model.json") != (kind == "model"):
                continue
            traits = _file_traits(path)
            if traits is not None and traits.name:
                found.append((path, traits))
    return found


def transferred_tables(
    table_dir: str | Path | None, this: DeviceTraits
) -> tuple[list[tuple[Path, dict]], TransferChoice]:
    """The tables of the device nearest ``this`` one (:func:`kernels.transfer.choose_device`)
    among the table files of :func:`search_directories`, in search order, and the choice; no
    tables when none may transfer."""
    if this.capability is None:  # nothing may transfer: no need to look
        return [], choose_device(this, ())
    files = device_files(search_directories(table_dir), "table")
    choice = choose_device(this, (traits for _, traits in files))
    if choice.device is None:
        return [], choice
    chosen = [path for path, traits in files if traits.name == choice.device.name]
    # Warnings name select_rope's caller: through here, the selector's data, select_rope.
    return read_tables(chosen, stacklevel=5), choice


def read_tables(paths: list[Path], *, stacklevel: int = 3) -> list[tuple[Path, dict]]:
    """Every readable, valid table among ``paths``, in order; bad ones warned about and skipped
    (``stacklevel`` counts from this function to ``select_rope``'s caller)."""
    known = provider_names()
    tables = []
    for path in paths:
        try:
            if not path.is_file():
                continue
            tables.append((path, read_table(path, known)))
        except Exception as exc:  # TableError, OSError, anything: never into the serving stack
            fault = str(exc) if isinstance(exc, TableError) else f"{path}: {exc!r}"
            warn_once(
                ("bad-table", str(path), fault),
                f"rope-autotune: skipping tuning table {fault}; trying the next source",
                stacklevel=stacklevel,
            )
    return tables


def warn_if_stale(path: Path, table: Mapping[str, Any]) -> None:
    """One warning when ``table`` was measured with other library versions than these."""
    recorded = table["metadata"].get("versions") or {}
    running = _table.library_versions()
    differing = [
        f"{lib} {recorded[lib]} (running {running.get(lib)})"
        for lib in _VERSIONED_LIBRARIES
        if lib in recorded and recorded[lib] != running.get(lib)
    ]
    if differing:
        warn_once(
            ("stale-table", str(path)),
            f"rope-autotune: tuning table {path} was measured with "
            + ", ".join(differing)
            + "; its entries are still used, re-tune to refresh them",
            stacklevel=3,
        )


def find_entries(
    tables: list[tuple[Path, dict]], spec: RopeSpec, timing: str, *, nearest: bool = True
) -> tuple[Path, dict, str] | None:
    """(file, table, spec key) of the exact spec in the first table having it, else (with
    ``nearest``) of the nearest spec in the first table having one, else None."""
    for path, table in tables:
        if spec.key in table["entries"].get(timing, {}):
            return path, table, spec.key
    if not nearest:
        return None
    for path, table in tables:
        key = nearest_spec_key(spec, table["entries"].get(timing, {}))
        if key is not None:
            return path, table, key
    return None


def _spec_distance(a: RopeSpec, b: RopeSpec) -> float:
    return abs(math.log(a.num_heads / b.num_heads)) + abs(math.log(a.num_kv_heads / b.num_kv_heads))


def nearest_spec_key(spec: RopeSpec, keys: Iterable[str]) -> str | None:
    """The table spec closest to ``spec``, or None.

    Candidates share ``spec``'s head size, rotary dim, style, element size (what decides the
    kernel's memory traffic and inner loop: bf16 and fp16 are interchangeable) and multimodal
    layout (its stream map, or none); among them the
    one with the smallest ``|log(Hq/Hq')| + |log(Hk/Hk')|`` wins (head counts differing by the
    same factor are equally near), then the one of ``spec``'s own dtype, then the smaller key
    (why: ``docs/DESIGN.md#nearest-spec-rule``).
    """
    best: tuple[float, bool, str] | None = None
    for key in keys:
        try:
            other = RopeSpec.from_key(key)
        except ValueError:
            continue
        if (other.head_size, other.rotary_dim, other.is_neox, other.dtype.itemsize) != (
            spec.head_size,
            spec.rotary_dim,
            spec.is_neox,
            spec.dtype.itemsize,
        ) or other.mrope_streams != spec.mrope_streams:
            continue
        candidate = (_spec_distance(spec, other), other.dtype != spec.dtype, key)
        if best is None or candidate < best:
            best = candidate
    return None if best is None else best[-1]
