"""Finding and reading this device's tuning tables for ``select_rope``.

The file named after the device (``NVIDIA H200`` -> ``NVIDIA_H200.json``) in each directory of
:func:`kernels.table.table_search_path` (or the one ``table_dir`` given), in order; a bad file
is skipped with one :class:`~kernels.table.RopeTableWarning`, a stale one (other library
versions) is used with one. In a timing mode's entries: the exact spec in the first table that
has it, else the nearest spec (:func:`nearest_spec_key`) in the first table that has one.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from . import table as _table  # module attributes: tests redirect the search path
from ._spec import RopeSpec
from .providers import provider_names
from .table import RopeTableWarning, TableError, read_table

__all__ = [
    "device_name",
    "find_entries",
    "nearest_spec_key",
    "read_tables",
    "table_files",
    "warn_if_stale",
    "warn_once",
]

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
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).name
    return _table.device_metadata(device)["device_name"]


def table_files(table_dir: str | Path | None, file_name: str) -> list[Path]:
    """``table_dir``'s table (or the ``.json`` file it names), else ``file_name`` in every
    directory of the search path, in order."""
    if table_dir is not None:
        path = Path(table_dir).expanduser()
        return [path if path.suffix == ".json" else path / file_name]
    return [directory / file_name for directory in _table.table_search_path()]


def read_tables(paths: list[Path]) -> list[tuple[Path, dict]]:
    """Every readable, valid table among ``paths``, in order; bad ones warned about and skipped."""
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
                stacklevel=3,
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
    (``benchmarks/NOTES.md`` has the measurements behind the rule).
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
