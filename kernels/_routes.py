"""Selection-time helpers of the selector: the bucket rule, the nearest-spec rule, and the
resolution of one table entry into a bound provider callable (a :class:`Route`).

Everything here runs once, when ``select_rope`` builds its dispatch lists; nothing here is on
the per-call path.
"""

from __future__ import annotations

import itertools
import math
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ._spec import RopeSpec
from .providers import RopeFn, default_triton_config, get_provider

__all__ = [
    "FALLBACK_BUCKETS",
    "Route",
    "bucket_index",
    "bucket_thresholds",
    "fallback_route",
    "nearest_spec_key",
    "resolve_entry",
]

# Buckets used when no table entry applies (fallback or a forced provider without a config):
# the default Triton config depends on the token count, so it gets one config per power of two.
FALLBACK_BUCKETS = tuple(2**i for i in range(17))  # 1 .. 65536


@dataclass(frozen=True)
class Route:
    """What one bucket runs: a provider, its config, the bound callable, and why.

    Attributes:
        provider: Registry name of the provider.
        config: The checked config the callable was bound with.
        fn: ``fn(positions, query, key, cos_sin_cache)``, in place.
        why: Human-readable reason for this choice (table entry, fallback...).
    """

    provider: str
    config: Mapping[str, Any]
    fn: RopeFn = field(repr=False)
    why: str


# -- buckets -------------------------------------------------------------------------------------


def bucket_thresholds(buckets: Sequence[int]) -> tuple[float, ...]:
    """Boundaries between consecutive sorted buckets: their geometric midpoints.

    A token count goes to the bucket nearest in log scale: bucket ``i`` serves counts up to and
    including ``sqrt(b[i] * b[i+1])``; a count exactly on a midpoint goes to the smaller bucket.
    """
    return tuple(math.sqrt(a * b) for a, b in itertools.pairwise(buckets))


def bucket_index(thresholds: Sequence[float], num_tokens: int) -> int:
    """Index of the bucket serving ``num_tokens`` (the per-call rule, shown for explain/tests)."""
    return bisect_left(thresholds, num_tokens)


# -- nearest spec --------------------------------------------------------------------------------


def _spec_distance(a: RopeSpec, b: RopeSpec) -> float:
    return abs(math.log(a.num_heads / b.num_heads)) + abs(math.log(a.num_kv_heads / b.num_kv_heads))


def nearest_spec_key(spec: RopeSpec, keys: Iterable[str]) -> str | None:
    """The table spec closest to ``spec``, or None.

    Candidates share ``spec``'s head size, rotary dim, style and element size (what decides the
    kernel's memory traffic and inner loop: bf16 and fp16 are interchangeable); among them the
    one with the smallest ``|log(Hq/Hq')| + |log(Hk/Hk')|`` wins (head counts differing by the
    same factor are equally near), then the one of ``spec``'s own dtype, then the smaller key.
    On the H200 a bf16-tuned config ran fp16 at the speed of the fp16-tuned one (median ratio
    1.00, at most 1.08, over 25 buckets; ``benchmarks/NOTES.md``).
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
        ):
            continue
        candidate = (_spec_distance(spec, other), other.dtype != spec.dtype, key)
        if best is None or candidate < best:
            best = candidate
    return None if best is None else best[-1]


# -- entry resolution ----------------------------------------------------------------------------


class _Availability:
    """Memo of ``provider.unavailable_reason(device)`` for one selection (imports may be slow)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._reasons: dict[str, str | None] = {}

    def __call__(self, name: str) -> str | None:
        if name not in self._reasons:
            try:
                self._reasons[name] = get_provider(name).unavailable_reason(self.device)
            except Exception as exc:  # unknown name, or a provider whose probe itself fails
                self._reasons[name] = f"{type(exc).__name__}: {exc}"
        return self._reasons[name]


def _try_bind(
    name: str,
    config: Mapping[str, Any] | None,
    spec: RopeSpec,
    bucket: int,
    has_key: bool,
    unavailable: _Availability,
) -> tuple[Route | None, str]:
    """Bind ``name`` for ``spec``, or say why not (a Route with an empty ``why``)."""
    reason = unavailable(name)
    if reason is not None:
        return None, f"{name} unavailable here ({reason})"
    provider = get_provider(name)
    reason = provider.unsupported_reason(spec, has_key=has_key)
    if reason is not None:
        return None, f"{name} does not support this call ({reason})"
    if config is None:
        config = provider.default_config(spec, bucket)
    try:
        full = provider.check_config(spec, config)
        fn = provider.bound(spec, full)
    except Exception as exc:  # invalid config for this spec (nearest-spec entries), bind errors
        return None, f"{name} rejected config {dict(config)} ({exc})"
    return Route(name, full, fn, ""), ""


def resolve_entry(
    spec: RopeSpec,
    bucket: int,
    entry: Mapping[str, Any],
    *,
    has_key: bool,
    unavailable: _Availability,
    where: str,
) -> Route | None:
    """Bind a table entry: its winner with its config, else the best available provider recorded
    in ``providers_us`` (with its default config), else None.

    Args:
        where: The entry's place for ``why``, e.g. ``"NVIDIA_H200.json entries.graph.<spec>.16"``.
    """
    winner, config = entry["provider"], entry.get("config") or {}
    candidates: list[tuple[str, Mapping[str, Any] | None, str]] = [(winner, config, "winner")]
    recorded = sorted(entry.get("providers_us", {}).items(), key=lambda item: (item[1], item[0]))
    for name, time_us in recorded:
        if name == winner and not config:
            continue  # the winner with its default config was just tried
        candidates.append((name, None, f"best available recorded ({time_us:.3g} us)"))
    skipped = []
    for name, cfg, label in candidates:
        route, why_not = _try_bind(name, cfg, spec, bucket, has_key, unavailable)
        if route is not None:
            why = f"{where}: {label}"
            if skipped:
                why += "; skipped " + "; ".join(skipped)
            return Route(route.provider, route.config, route.fn, why)
        skipped.append(why_not)
    return None


def fallback_route(
    spec: RopeSpec, device: torch.device, bucket: int, has_key: bool, why: str
) -> Route:
    """The untuned choice: Triton's default config on CUDA, ``torch`` elsewhere (or when Triton
    cannot serve), which runs every spec on every device."""
    if device.type == "cuda":
        unavailable = _Availability(device)
        route, _ = _try_bind(
            "triton", default_triton_config(spec, bucket), spec, bucket, has_key, unavailable
        )
        if route is not None:
            return Route(route.provider, route.config, route.fn, why)
    provider = get_provider("torch")
    return Route("torch", {}, provider.bound(spec, {}), why)
