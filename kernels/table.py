"""Per-device tuning tables: where they live, their metadata, and (re-exported) their format
and safe writing.

- Format (:mod:`kernels._table_format`): schema, :class:`TableEntry` (one bucket's entry;
  :func:`spec_entries` reads a spec's), :func:`validate_table`, :func:`salvage_table`,
  :func:`read_table`, :func:`merge_tables`.
- Writing (:mod:`kernels._table_write`): :func:`write_table` and :func:`merge_into_table`,
  atomic and serialized by a lock file beside the table, so concurrent writers of one directory
  lose nothing; :func:`check_table_target`, the pre-flight a tuner runs before measuring; and
  what every file the tuner writes relies on: :func:`check_output_dir` (an output directory
  checked once per run, :class:`OutputDir`; with :func:`existing_ancestor` and
  :func:`unwritable_reason`) and :func:`write_atomically`.
- Here: the search path (:func:`table_search_path`) and the metadata header
  (:func:`device_metadata`: :func:`hardware_metadata`, :func:`library_versions`).
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from pathlib import Path
from typing import Any

import torch

from ._table_format import (
    SCHEMA_VERSION,
    TIMING_MODES,
    RopeTableWarning,
    TableEntry,
    TableError,
    device_table_name,
    empty_table,
    merge_tables,
    read_table,
    salvage_table,
    spec_entries,
    validate_table,
)
from ._table_write import (
    OutputDir,
    TableTarget,
    check_output_dir,
    check_table_target,
    existing_ancestor,
    merge_into_table,
    unwritable_reason,
    write_atomically,
    write_table,
)

__all__ = [
    "CONFIG_DIR_ENV",
    "SCHEMA_VERSION",
    "TIMING_MODES",
    "OutputDir",
    "RopeTableWarning",
    "TableEntry",
    "TableError",
    "TableTarget",
    "check_output_dir",
    "check_table_target",
    "device_metadata",
    "device_table_name",
    "empty_table",
    "existing_ancestor",
    "hardware_metadata",
    "library_versions",
    "merge_into_table",
    "merge_tables",
    "read_table",
    "salvage_table",
    "shipped_config_dir",
    "source_version",
    "spec_entries",
    "table_search_path",
    "unwritable_reason",
    "user_config_dir",
    "validate_table",
    "write_atomically",
    "write_table",
]

CONFIG_DIR_ENV = "ROPE_AUTOTUNE_CONFIG_DIR"


# -- where tables live ---------------------------------------------------------------------------


def user_config_dir() -> Path:
    """Where the tuner writes by default and ``select_rope`` looks second."""
    import platformdirs  # light, but only needed here

    return Path(platformdirs.user_config_dir("rope-autotune"))


def shipped_config_dir() -> Path:
    """Tables shipped with the package: ``kernels/configs`` once installed, else the
    repository's ``configs/`` (a source checkout or editable install)."""
    installed = Path(__file__).resolve().parent / "configs"
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parent.parent / "configs"


def table_search_path() -> list[Path]:
    """Directories searched for a table, first match wins: ``$ROPE_AUTOTUNE_CONFIG_DIR``, the
    user config directory, the shipped tables."""
    dirs = []
    env = os.environ.get(CONFIG_DIR_ENV)
    if env:
        dirs.append(Path(env).expanduser())
    dirs += [user_config_dir(), shipped_config_dir()]
    return dirs


# -- metadata ------------------------------------------------------------------------------------


_VERSION_LINE = re.compile(r"""^__version__\s*=\s*(?:version\s*=\s*)?["']([^"']+)["']""", re.M)


def source_version(package: str) -> str | None:
    """The version in ``<package>/_version.py`` of an importable package that has no
    distribution metadata (vLLM's files put on the path without pip, as on a machine that
    loads only its op library), read without importing the package; None when not found."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "_version.py"
        if path.is_file():
            match = _VERSION_LINE.search(path.read_text(errors="replace"))
            if match:
                return match.group(1)
    return None


def library_versions() -> dict[str, str | None]:
    """Versions of the libraries a measurement depends on; None for those not installed."""
    from importlib import metadata

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    import triton

    return {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "flashinfer": version("flashinfer-python") or version("flashinfer"),
        "vllm": version("vllm") or source_version("vllm"),
        "rope_autotune": version("rope-autotune"),
    }


def _positive(value: Any) -> Any:
    """``value`` when it is a positive number, else None (a property this driver reports as 0
    or does not have)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    return value if ok else None


def hardware_metadata(device: torch.device | str) -> dict[str, Any]:
    """What a device is, as a table's metadata records it: ``device_name``,
    ``compute_capability`` (``"9.0"``; None for a CPU), ``sm_count``, ``l2_cache_bytes`` and
    ``memory_bandwidth_gb_s`` (the theoretical peak, memory clock times bus width, in 1e9
    bytes/s); None for what the device or this torch does not report."""
    device = torch.device(device)
    if device.type != "cuda":
        import platform

        return {
            "device_name": f"CPU {platform.machine()}",
            "compute_capability": None,
            "sm_count": None,
            "l2_cache_bytes": None,
            "memory_bandwidth_gb_s": None,
        }
    props = torch.cuda.get_device_properties(device)
    clock_khz = _positive(getattr(props, "memory_clock_rate", None))
    bus_bits = _positive(getattr(props, "memory_bus_width", None))
    # Double data rate: two transfers of the bus width per memory clock.
    bandwidth = None if not (clock_khz and bus_bits) else 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9
    return {
        "device_name": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count,
        "l2_cache_bytes": _positive(getattr(props, "L2_cache_size", None)),
        "memory_bandwidth_gb_s": None if bandwidth is None else round(bandwidth, 1),
    }


def device_metadata(device: torch.device | str) -> dict[str, Any]:
    """The metadata header for a table measured on ``device``: :func:`hardware_metadata`,
    the library versions and the time (UTC)."""
    return {
        **hardware_metadata(device),
        "versions": library_versions(),
        "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
