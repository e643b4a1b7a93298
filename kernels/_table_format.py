"""Per-device tuning tables: schema, validation, atomic writes, merging and where they live.

One JSON file per device, named from the device name (``NVIDIA H200`` -> ``NVIDIA_H200.json``)::

    {
      "schema_version": 1,
      "metadata": {
        "device_name": "NVIDIA H200", "compute_capability": "9.0", "sm_count": 132,
        "versions": {"torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0",
                     "flashinfer": "0.6.14", "vllm": null, "rope_autotune": "0.1.0"},
        "updated": "2026-11-29T05:00:00+00:00"
      },
      "entries": {
        "graph": {                                   # timing mode: "graph" or "eager"
          "q32_kv8_d128_r128_neox_bfloat16": {       # RopeSpec.key
            "4096": {                                # token bucket
              "provider": "triton",
              "config": {"block_t": 4, "block_h": 8, ...},
              "median_us": 21.3, "p20_us": 21.1, "p80_us": 21.6,
              "providers_us": {"triton": 21.3, "flashinfer": 22.9, "vllm": 35.0}
            }
          }
        },
        "eager": {...}
      }
    }

``providers_us`` holds each measured provider's best median, so a reader whose winning provider
is unavailable can fall back to the next best one recorded. :func:`validate_table` is the one
check that both the tuner (before writing) and the selector (after reading) apply.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson
import torch

from ._spec import RopeSpec

__all__ = [
    "CONFIG_DIR_ENV",
    "SCHEMA_VERSION",
    "TIMING_MODES",
    "TableError",
    "device_metadata",
    "device_table_name",
    "empty_table",
    "library_versions",
    "merge_tables",
    "read_table",
    "shipped_config_dir",
    "table_search_path",
    "user_config_dir",
    "validate_table",
    "write_table",
]

SCHEMA_VERSION = 1
TIMING_MODES = ("graph", "eager")
CONFIG_DIR_ENV = "ROPE_AUTOTUNE_CONFIG_DIR"


class TableError(ValueError):
    """A tuning table that cannot be used; the message names the file and the fault."""


# -- where tables live ---------------------------------------------------------------------------


def device_table_name(device_name: str) -> str:
    """File name of a device's table: spaces to underscores, nothing unsafe in a path."""
    name = re.sub(r"\s+", "_", device_name.strip())
    return re.sub(r"[^A-Za-z0-9_.\-]", "-", name) + ".json"


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


def device_metadata(device: torch.device | str) -> dict[str, Any]:
    """The metadata header for a table measured on ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name, capability, sms = (
            props.name,
            f"{props.major}.{props.minor}",
            props.multi_processor_count,
        )
    else:
        import platform

        name, capability, sms = f"CPU {platform.machine()}", None, None
    return {
        "device_name": name,
        "compute_capability": capability,
        "sm_count": sms,
        "versions": library_versions(),
        "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def empty_table(metadata: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "metadata": dict(metadata),
        "entries": {mode: {} for mode in TIMING_MODES},
    }


# -- validation ----------------------------------------------------------------------------------


def _positive_time(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def validate_table(table: Any, known_providers: Iterable[str] | None = None) -> None:
    """Check ``table`` against the schema.

    Args:
        table: The decoded JSON.
        known_providers: Provider names an entry may use; None accepts any name.

    Raises:
        TableError: the first fault found, with its path in the table (file name not included).
    """
    known = None if known_providers is None else set(known_providers)
    if not isinstance(table, dict):
        raise TableError(f"expected a JSON object at the top, got {type(table).__name__}")
    version = table.get("schema_version")
    if version != SCHEMA_VERSION:
        raise TableError(f"schema_version: expected {SCHEMA_VERSION}, got {version!r}")
    metadata = table.get("metadata")
    if not isinstance(metadata, dict) or not isinstance(metadata.get("device_name"), str):
        raise TableError("metadata: expected an object with a device_name string")
    if not isinstance(metadata.get("versions", {}), dict):
        raise TableError("metadata.versions: expected an object")
    entries = table.get("entries")
    if not isinstance(entries, dict):
        raise TableError("entries: expected an object keyed by timing mode")
    for mode, specs in entries.items():
        if mode not in TIMING_MODES:
            raise TableError(f"entries: unknown timing mode {mode!r}, expected {TIMING_MODES}")
        if not isinstance(specs, dict):
            raise TableError(f"entries.{mode}: expected an object keyed by spec")
        for spec_key, buckets in specs.items():
            where = f"entries.{mode}.{spec_key}"
            try:
                RopeSpec.from_key(spec_key)
            except ValueError as exc:
                raise TableError(f"{where}: {exc}") from None
            if not isinstance(buckets, dict) or not buckets:
                raise TableError(f"{where}: expected a non-empty object keyed by token count")
            for bucket, entry in buckets.items():
                _validate_entry(f"{where}.{bucket}", bucket, entry, known)


def _validate_entry(where: str, bucket: str, entry: Any, known: set[str] | None) -> None:
    if not (isinstance(bucket, str) and bucket.isdigit() and int(bucket) > 0):
        raise TableError(f"{where}: token bucket must be a positive integer, got {bucket!r}")
    if not isinstance(entry, dict):
        raise TableError(f"{where}: expected an object")
    provider = entry.get("provider")
    if not isinstance(provider, str):
        raise TableError(f"{where}.provider: expected a string, got {provider!r}")
    if known is not None and provider not in known:
        raise TableError(f"{where}.provider: unknown provider {provider!r}, known: {sorted(known)}")
    config = entry.get("config")
    if config is not None and not (
        isinstance(config, dict)
        and all(isinstance(v, (int, float, str, bool)) for v in config.values())
    ):
        raise TableError(f"{where}.config: expected null or an object of scalars, got {config!r}")
    for field in ("median_us", "p20_us", "p80_us"):
        if (field in entry or field == "median_us") and not _positive_time(entry.get(field)):
            raise TableError(
                f"{where}.{field}: expected a positive finite time, got {entry.get(field)!r}"
            )
    times = entry.get("providers_us", {})
    if not isinstance(times, dict):
        raise TableError(f"{where}.providers_us: expected an object")
    for name, value in times.items():
        if known is not None and name not in known:
            raise TableError(f"{where}.providers_us: unknown provider {name!r}")
        if not _positive_time(value):
            raise TableError(
                f"{where}.providers_us.{name}: expected a positive finite time, got {value!r}"
            )


# -- reading, writing, merging -------------------------------------------------------------------


def read_table(path: str | os.PathLike, known_providers: Iterable[str] | None = None) -> dict:
    """Read and validate a table.

    Raises:
        TableError: unreadable, not JSON, or off the schema; the message names the file.
        FileNotFoundError: there is no such file.
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        table = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise TableError(f"{path}: not valid JSON ({exc})") from None
    try:
        validate_table(table, known_providers)
    except TableError as exc:
        raise TableError(f"{path}: {exc}") from None
    return table


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it; set straight back
    os.umask(mask)
    return mask


# Read once, at import (reading it briefly changes it, which threads could observe).
_UMASK = _read_umask()


def write_table(
    path: str | os.PathLike, table: Mapping[str, Any], known_providers: Iterable[str] | None = None
) -> Path:
    """Validate ``table`` and write it atomically (temporary file, fsync, rename), sorted keys.

    A reader sees the old file or the new one, never a torn one, even if the writer dies.
    """
    validate_table(table, known_providers)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = orjson.dumps(table, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload + b"\n")
            f.flush()
            # mkstemp makes the file owner-only; a table is read by serving processes that may
            # run as another user, so give it the permissions a plain open() would.
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def merge_tables(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
    """``new`` laid over ``old``: each (mode, spec, bucket) in ``new`` replaces the old entry,
    every other old entry is kept; the metadata is ``new``'s."""
    merged = empty_table(new["metadata"])
    for source in (old or {}).get("entries", {}), new["entries"]:
        for mode, specs in source.items():
            for spec_key, buckets in specs.items():
                merged["entries"].setdefault(mode, {}).setdefault(spec_key, {}).update(buckets)
    return merged
