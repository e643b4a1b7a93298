"""Which device's measured data a device without its own table or model may use.

The rule, a pure function of the devices' metadata (:func:`choose_device`):

1. Only GPUs transfer: a device without a compute capability (a CPU) never uses another
   device's data, and a GPU never uses a CPU's.
2. Same compute capability (major.minor) first, then the same major; never across majors:
   there the untuned default runs. Tuned configs stay valid on any architecture (the Triton
   kernel's restrictions depend on the spec, not the device), but which provider and config
   win is measured on one memory system and one code generator; within one architecture
   family the winners carry, across families the default's few rules are the safer bet.
3. Among those, the device nearest in what decides a memory-bound kernel:
   :func:`device_distance`, the sum over SM count, memory bandwidth and L2 size of
   ``|log(a / b)|`` (a factor of 2 either way counts ``log 2``); a quantity either device
   does not report counts ``log 2``. Ties go to the device name first in sorted order.

``docs/DESIGN.md`` (transfer to an unmeasured GPU) states the rule and why.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "TRANSFER_ENV",
    "DeviceTraits",
    "TransferChoice",
    "choose_device",
    "device_distance",
    "transfer_enabled",
]

# "0", "off", "false" or "no" switch transfer off for every select_rope that does not say.
TRANSFER_ENV = "ROPE_AUTOTUNE_TRANSFER"

# The term of a quantity one of the two devices does not report: as far as a factor of 2.
_UNKNOWN_TERM = math.log(2)
_CAPABILITY = re.compile(r"([0-9]+)\.([0-9]+)", re.ASCII)


def _positive(value: Any) -> float | None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if number and math.isfinite(value) and value > 0 else None


@dataclass(frozen=True)
class DeviceTraits:
    """A device as the transfer rule sees it, read from a table's or model's ``metadata``.

    Attributes:
        name: ``device_name``.
        capability: ``(major, minor)`` from ``compute_capability`` (``"9.0"``); None for a
            CPU, or a value that is not ``"<int>.<int>"``.
        sm_count: Streaming multiprocessors, or None.
        bandwidth_gb_s: Memory bandwidth in 1e9 bytes/s: the theoretical peak
            (``memory_bandwidth_gb_s``) when recorded, else a measured copy bandwidth
            (``copy_bandwidth_gb_s``, read plus write), else None.
        bandwidth_measured: Whether ``bandwidth_gb_s`` is the measured copy bandwidth.
        l2_cache_bytes: L2 size in bytes, or None.
    """

    name: str
    capability: tuple[int, int] | None
    sm_count: float | None = None
    bandwidth_gb_s: float | None = None
    bandwidth_measured: bool = False
    l2_cache_bytes: float | None = None

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> DeviceTraits:
        """Traits from a metadata header; a missing or ill-typed field is unknown (None),
        never an error."""
        match = _CAPABILITY.fullmatch(str(metadata.get("compute_capability") or ""))
        peak = _positive(metadata.get("memory_bandwidth_gb_s"))
        copy = _positive(metadata.get("copy_bandwidth_gb_s"))
        return cls(
            name=str(metadata.get("device_name", "")),
            capability=None if match is None else (int(match[1]), int(match[2])),
            sm_count=_positive(metadata.get("sm_count")),
            bandwidth_gb_s=peak if peak is not None else copy,
            bandwidth_measured=peak is None and copy is not None,
            l2_cache_bytes=_positive(metadata.get("l2_cache_bytes")),
        )

    @property
    def capability_text(self) -> str:
        """``"9.0"``, or ``"none"`` for a device without a compute capability."""
        return "none" if self.capability is None else "{}.{}".format(*self.capability)


def _log_ratio(a: float | None, b: float | None) -> float:
    return _UNKNOWN_TERM if a is None or b is None else abs(math.log(a / b))


def device_distance(a: DeviceTraits, b: DeviceTraits) -> float:
    """``|log(sm_a/sm_b)| + |log(bw_a/bw_b)| + |log(l2_a/l2_b)|``; a quantity either device
    lacks counts ``log 2``. Bandwidths compare like with like: the theoretical peaks when both
    record one, else the measured copies when both do, else the term is unknown."""
    bandwidth = (
        _log_ratio(a.bandwidth_gb_s, b.bandwidth_gb_s)
        if a.bandwidth_measured == b.bandwidth_measured
        else _UNKNOWN_TERM
    )
    return (
        _log_ratio(a.sm_count, b.sm_count)
        + bandwidth
        + _log_ratio(a.l2_cache_bytes, b.l2_cache_bytes)
    )


@dataclass(frozen=True)
class TransferChoice:
    """The outcome of :func:`choose_device`.

    Attributes:
        device: The device whose data to use, or None (nothing may transfer).
        why: One line: why this device (``"same compute capability 9.0, nearest in SM count,
            memory bandwidth and L2 size at distance 0.39"``), or why none.
        distance: :func:`device_distance` to the chosen device (None without one).
    """

    device: DeviceTraits | None
    why: str
    distance: float | None = None


def choose_device(this: DeviceTraits, candidates: Iterable[DeviceTraits]) -> TransferChoice:
    """The candidate whose measured data ``this`` device uses, by the module's rule.

    Candidates named like ``this`` are left out (that is this device's own data); of several
    with one name, the first stands for the device (the search path's order).

    Returns:
        A :class:`TransferChoice`; its ``device`` is None when no candidate may transfer, and
        its ``why`` then says why (a CPU, no GPU data, only other architectures).
    """
    others: dict[str, DeviceTraits] = {}
    for candidate in candidates:
        if candidate.name != this.name:
            others.setdefault(candidate.name, candidate)
    if this.capability is None:
        return TransferChoice(None, "no transfer to a device without a compute capability")
    gpus = [c for c in others.values() if c.capability is not None]
    if not gpus:
        return TransferChoice(None, "no other GPU's data found")
    major = this.capability[0]
    tiers = (
        (f"same compute capability {this.capability_text}",
         [c for c in gpus if c.capability == this.capability]),
        (f"same architecture {major}.x", [c for c in gpus if c.capability[0] == major]),
    )  # fmt: skip
    for tier, pool in tiers:
        if pool:
            best = min(pool, key=lambda c: (device_distance(this, c), c.name))
            distance = device_distance(this, best)
            why = (
                f"{tier}, nearest in SM count, memory bandwidth and L2 size "
                f"at distance {distance:.2f}"
            )
            return TransferChoice(best, why, distance)
    found = ", ".join(sorted(f"{c.name} ({c.capability_text})" for c in gpus))
    return TransferChoice(
        None,
        f"not transferred across architectures: {this.capability_text} here, data only of {found}",
    )


def transfer_enabled(transfer: bool | None = None) -> bool:
    """``transfer`` when given, else ``$ROPE_AUTOTUNE_TRANSFER`` (on unless ``0``, ``off``,
    ``false`` or ``no``)."""
    if transfer is not None:
        return bool(transfer)
    value = os.environ.get(TRANSFER_ENV, "").strip().lower()
    return value not in ("0", "off", "false", "no")
