"""The tuning table's format: schema, validation, salvage of damaged tables, reading, merging.

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
            "4096": {                                # token bucket: canonical decimal ASCII
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
is unavailable can fall back to the next best one recorded. An entry is read as a
:class:`TableEntry`. :func:`validate_table` is the one check that both the tuner (before writing)
and the selector (after reading) apply, and :meth:`TableEntry.from_json` applies the same check
to one entry; :func:`salvage_table` keeps the valid entries of a table with bad ones (merging).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson

from ._spec import RopeSpec
from .providers import get_provider, provider_names

__all__ = [
    "SCHEMA_VERSION",
    "TIMING_MODES",
    "RopeTableWarning",
    "TableEntry",
    "TableError",
    "device_table_name",
    "empty_table",
    "merge_tables",
    "parse_table",
    "read_table",
    "salvage_table",
    "spec_entries",
    "validate_table",
]

SCHEMA_VERSION = 1
TIMING_MODES = ("graph", "eager")
# A token bucket as written by the tuner: a positive int in canonical decimal ASCII ("16", not
# "016", "16.0" or "١٦"), so that str(int(key)) == key.
_BUCKET = re.compile(r"[1-9][0-9]*", re.ASCII)


class TableError(ValueError):
    """A tuning table that cannot be used; the message names the file and the fault."""


class RopeTableWarning(UserWarning):
    """A tuning table was skipped, is stale, lost entries, or is missing; RoPE still runs."""


def device_table_name(device_name: str) -> str:
    """File name of a device's table: spaces to underscores, nothing unsafe in a path."""
    name = re.sub(r"\s+", "_", device_name.strip())
    return re.sub(r"[^A-Za-z0-9_.\-]", "-", name) + ".json"


def empty_table(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """A table with ``metadata`` and no entries."""
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
        known_providers: Provider names an entry may use; None accepts any name. A registered
            provider's config must also lie in its ``param_space``, value types included
            (``4``, not ``4.0`` or ``True``).

    Raises:
        TableError: the first fault found, with its path in the table (file name not included).
    """
    _validate_frame(table)
    known = None if known_providers is None else set(known_providers)
    for where, bucket, entry in _entries(table):
        _validate_entry(where, bucket, entry, known)


def salvage_table(
    table: Any, known_providers: Iterable[str] | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Keep every entry of ``table`` that validates; drop the others.

    Returns:
        ``(table, dropped)``: a valid table (possibly without entries) and one line per dropped
        entry or spec, naming its place in the table and the fault.

    Raises:
        TableError: the table's frame (top level, ``schema_version``, ``metadata``,
            ``entries``) is off the schema: nothing in it can be trusted.
    """
    _validate_frame(table)
    known = None if known_providers is None else set(known_providers)
    kept = empty_table(table["metadata"])
    dropped: list[str] = []
    for mode, specs in table["entries"].items():
        for spec_key, buckets in specs.items():
            where = f"entries.{mode}.{spec_key}"
            fault = _spec_fault(spec_key, buckets)
            if fault is not None:
                dropped.append(f"{where}: {fault}")
                continue
            for bucket, entry in buckets.items():
                try:
                    _validate_entry(f"{where}.{bucket}", bucket, entry, known)
                except TableError as exc:
                    dropped.append(str(exc))
                    continue
                kept["entries"][mode].setdefault(spec_key, {})[bucket] = entry
    return kept, dropped


def _validate_frame(table: Any) -> None:
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


def _spec_fault(spec_key: str, buckets: Any) -> str | None:
    try:
        RopeSpec.from_key(spec_key)
    except ValueError as exc:
        return str(exc)
    if not isinstance(buckets, dict) or not buckets:
        return "expected a non-empty object keyed by token count"
    return None


def _entries(table: dict) -> Iterable[tuple[str, str, Any]]:
    """(place, bucket, entry) of every entry; raises TableError on a bad spec."""
    for mode, specs in table["entries"].items():
        for spec_key, buckets in specs.items():
            where = f"entries.{mode}.{spec_key}"
            fault = _spec_fault(spec_key, buckets)
            if fault is not None:
                raise TableError(f"{where}: {fault}")
            for bucket, entry in buckets.items():
                yield f"{where}.{bucket}", bucket, entry


def _config_fault(provider: str, config: Any) -> str | None:
    if config is None:
        return None
    if not isinstance(config, dict):
        return f"expected null or an object, got {config!r}"
    if provider in provider_names():
        return get_provider(provider).config_fault(config)
    # An unregistered provider (any name accepted): only plain JSON scalars, no floats, whose
    # equality with ints (4.0 == 4) would let a non-canonical value through.
    for name, value in config.items():
        if not isinstance(value, (int, str, bool)):
            return f"{name}: expected an int, string or bool, got {value!r}"
    return None


def _validate_entry(where: str, bucket: Any, entry: Any, known: set[str] | None) -> None:
    if not (isinstance(bucket, str) and _BUCKET.fullmatch(bucket)):
        raise TableError(
            f"{where}: token bucket must be a positive integer in canonical decimal form, "
            f"got {bucket!r}"
        )
    _check_entry(where, entry, known)


def _check_entry(where: str, entry: Any, known: set[str] | None) -> None:
    """Raise TableError naming ``where`` when ``entry`` (decoded JSON) is off the schema."""
    if not isinstance(entry, dict):
        raise TableError(f"{where}: expected an object")
    provider = entry.get("provider")
    if not isinstance(provider, str):
        raise TableError(f"{where}.provider: expected a string, got {provider!r}")
    if known is not None and provider not in known:
        raise TableError(f"{where}.provider: unknown provider {provider!r}, known: {sorted(known)}")
    fault = _config_fault(provider, entry.get("config"))
    if fault is not None:
        raise TableError(f"{where}.config: {fault}")
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


# -- one entry -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TableEntry:
    """One token bucket's entry: the winner, its config and times, and every measured provider's
    best median (times in microseconds).

    Attributes:
        provider: The winning provider's registry name.
        config: The winner's config; None when the table records none (the provider's default
            for the bucket). ``{}`` and None are kept apart so that an entry writes back as read.
        median_us: The winner's median time.
        p20_us: Its 20th percentile, or None when not recorded.
        p80_us: Its 80th percentile, or None when not recorded.
        providers_us: Each measured provider's best median, the winner's included; a reader
            whose winner cannot run falls back to the fastest other one that can.
    """

    provider: str
    config: Mapping[str, Any] | None
    median_us: float
    p20_us: float | None = None
    p80_us: float | None = None
    providers_us: Mapping[str, float] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_json(
        cls,
        data: Any,
        *,
        where: str = "entry",
        known_providers: Iterable[str] | None = None,
    ) -> TableEntry:
        """The entry that ``data`` (decoded JSON) records, checked as :func:`validate_table`
        checks each entry (numbers keep their JSON type, so an entry writes back byte for byte).

        Args:
            where: The entry's place, for the error message.
            known_providers: Provider names it may use; None accepts any name.

        Raises:
            TableError: ``data`` is off the schema; the message starts with ``where``.
        """
        _check_entry(where, data, None if known_providers is None else set(known_providers))
        config = data.get("config")
        return cls(
            provider=data["provider"],
            config=None if config is None else dict(config),
            median_us=data["median_us"],
            p20_us=data.get("p20_us"),
            p80_us=data.get("p80_us"),
            providers_us=dict(data.get("providers_us", {})),
        )

    def to_json(self) -> dict[str, Any]:
        """The entry as the table's JSON object (``p20_us`` and ``p80_us`` left out when None)."""
        data: dict[str, Any] = {
            "provider": self.provider,
            "config": None if self.config is None else dict(self.config),
            "median_us": self.median_us,
        }
        for name, value in (("p20_us", self.p20_us), ("p80_us", self.p80_us)):
            if value is not None:
                data[name] = value
        data["providers_us"] = dict(self.providers_us)
        return data


def spec_entries(table: Mapping[str, Any], timing: str, spec_key: str) -> dict[int, TableEntry]:
    """The entries of ``spec_key`` in ``timing`` mode by token bucket, smallest first; empty when
    the table has none.

    Raises:
        TableError: an entry is off the schema (never for a validated table).
    """
    buckets = table["entries"].get(timing, {}).get(spec_key, {})
    where = f"entries.{timing}.{spec_key}"
    return {
        int(bucket): TableEntry.from_json(data, where=f"{where}.{bucket}")
        for bucket, data in sorted(buckets.items(), key=lambda item: int(item[0]))
    }


# -- reading and merging -------------------------------------------------------------------------


def parse_table(data: bytes, path: str | os.PathLike) -> Any:
    """Decode a table file's bytes (not validated).

    Raises:
        TableError: not valid JSON; the message names ``path``.
    """
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise TableError(f"{path}: not valid JSON ({exc})") from None


def read_table(path: str | os.PathLike, known_providers: Iterable[str] | None = None) -> dict:
    """Read and validate a table.

    Raises:
        TableError: not JSON, or off the schema; the message names the file.
        OSError: the file cannot be read (FileNotFoundError: there is none).
    """
    path = Path(path)
    table = parse_table(path.read_bytes(), path)
    try:
        validate_table(table, known_providers)
    except TableError as exc:
        raise TableError(f"{path}: {exc}") from None
    return table


def merge_tables(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
    """``new`` laid over ``old``: each (mode, spec, bucket) in ``new`` replaces the old entry,
    every other old entry is kept; the metadata is ``new``'s."""
    merged = empty_table(new["metadata"])
    for source in (old or {}).get("entries", {}), new["entries"]:
        for mode, specs in source.items():
            for spec_key, buckets in specs.items():
                merged["entries"].setdefault(mode, {}).setdefault(spec_key, {}).update(buckets)
    return merged
