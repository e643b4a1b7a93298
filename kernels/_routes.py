"""Routes: what each token bucket of a selector runs, built once at selection time.

A :class:`Route` is a provider, its config and its built callable, with the reason for the
choice. Here are the bucket rule (:func:`bucket_thresholds`), the resolution of a table entry
into a route (:func:`resolve_entry`: its winner, else the best available recorded provider),
the untuned fallback (:func:`fallback_route`) and forced providers (:func:`forced_routes`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ._spec import RopeSpec
from ._table_format import TableEntry
from .providers import RopeFn, fallback_providers, get_provider, reference_provider

__all__ = [
    "FALLBACK_BUCKETS",
    "Availability",
    "Route",
    "bucket_thresholds",
    "fallback_buckets",
    "fallback_description",
    "fallback_route",
    "forced_routes",
    "resolve_entry",
    "try_route",
]

# Buckets used when no table entry applies (fallback or a forced provider without a config):
# a tunable provider's default config may depend on the token count, so it gets one config per
# power of two.
FALLBACK_BUCKETS = tuple(2**i for i in range(17))  # 1 .. 65536


@dataclass(frozen=True)
class Route:
    """What one bucket runs: a provider, its config, the built callable, and why.

    Attributes:
        provider: Registry name of the provider.
        config: The checked config the callable was built with.
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


# -- entry resolution ----------------------------------------------------------------------------


class Availability:
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


def try_route(
    name: str,
    config: Mapping[str, Any] | None,
    spec: RopeSpec,
    bucket: int,
    has_key: bool,
    unavailable: Availability,
) -> tuple[Route | None, str]:
    """A route of ``name`` (``config``, or its default for ``bucket`` when None) for ``spec``,
    with an empty ``why`` for the caller to fill; or None and why not."""
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
        fn = provider.callable_for(spec, full)
    except Exception as exc:  # invalid config for this spec (nearest-spec entries), build errors
        return None, f"{name} rejected config {dict(config)} ({exc})"
    return Route(name, full, fn, ""), ""


def resolve_entry(
    spec: RopeSpec,
    bucket: int,
    entry: TableEntry | Mapping[str, Any],
    *,
    has_key: bool,
    unavailable: Availability,
    where: str,
) -> Route | None:
    """Route a table entry: its winner with its config, else the best available provider recorded
    in ``providers_us`` (with its default config), else None.

    Args:
        entry: The entry, or its JSON object from a validated table.
        where: The entry's place for ``why``, e.g. ``"NVIDIA_H200.json entries.graph.<spec>.16"``.
    """
    if not isinstance(entry, TableEntry):
        entry = TableEntry.from_json(entry, where=where)
    winner, config = entry.provider, entry.config or {}
    candidates: list[tuple[str, Mapping[str, Any] | None, str]] = [(winner, config, "winner")]
    recorded = sorted(entry.providers_us.items(), key=lambda item: (item[1], item[0]))
    for name, time_us in recorded:
        if name == winner and not config:
            continue  # the winner with its default config was just tried
        candidates.append((name, None, f"best available recorded ({time_us:.3g} us)"))
    skipped = []
    for name, cfg, label in candidates:
        route, why_not = try_route(name, cfg, spec, bucket, has_key, unavailable)
        if route is not None:
            why = f"{where}: {label}"
            if skipped:
                why += "; skipped " + "; ".join(skipped)
            return Route(route.provider, route.config, route.fn, why)
        skipped.append(why_not)
    return None


def fallback_buckets(device: torch.device) -> tuple[int, ...]:
    """Buckets of an untuned selection: :data:`FALLBACK_BUCKETS` where a provider's default
    config is the fallback on ``device`` (:func:`~kernels.providers.fallback_providers`), one
    bucket where the reference provider alone is."""
    return FALLBACK_BUCKETS if fallback_providers(device) else (1,)


def fallback_description(device: torch.device) -> str:
    """What an untuned selection runs on ``device``, for messages: ``"<name>'s default
    config"`` for each fallback provider, then the reference provider's name."""
    names = [f"{p.name}'s default config" for p in fallback_providers(device)]
    return ", else ".join([*names, reference_provider().name])


def fallback_route(
    spec: RopeSpec, device: torch.device, bucket: int, has_key: bool, why: str
) -> Route:
    """The untuned choice: the first of ``device``'s fallback providers
    (:attr:`~kernels.providers.Provider.fallback_on`) that is available and supports the call,
    with its default config for ``bucket``; else the reference provider, which runs every spec
    on every device."""
    unavailable = Availability(device)
    for provider in fallback_providers(device):
        route, _ = try_route(provider.name, None, spec, bucket, has_key, unavailable)
        if route is not None:
            return Route(route.provider, route.config, route.fn, why)
    reference = reference_provider()
    config = reference.check_config(spec, None)
    return Route(reference.name, config, reference.callable_for(spec, config), why)


def forced_routes(
    spec: RopeSpec, device: torch.device, provider: str, config: Mapping[str, Any] | None
) -> tuple[tuple[int, ...], tuple[Route, ...], tuple[Route, ...]]:
    """Buckets, routes with a key and routes without one for a forced provider (and config).

    Raises:
        KeyError: no such provider.
        ValueError: it cannot run on ``device``, or ``config`` is invalid for ``spec``.
    """
    chosen = get_provider(provider)
    reason = chosen.unavailable_reason(device)
    if reason is not None:
        raise ValueError(f"provider: {provider!r} is unavailable on {device}: {reason}")
    buckets = (1,) if config is not None else FALLBACK_BUCKETS
    why = f"forced: provider={provider!r}" + (f", config={dict(config)}" if config else "")
    keyless_reason = chosen.unsupported_reason(spec, has_key=False)
    routes, keyless = [], []
    for bucket in buckets:
        full = chosen.check_config(
            spec, config if config is not None else chosen.default_config(spec, bucket)
        )
        route = Route(provider, full, chosen.callable_for(spec, full), why)
        routes.append(route)
        if keyless_reason is None:
            keyless.append(route)
        else:
            keyless.append(Route(provider, full, _refuse_keyless(provider, keyless_reason), why))
    return buckets, tuple(routes), tuple(keyless)


def _refuse_keyless(provider: str, reason: str):
    def refuse(positions, query, key, cos_sin_cache):
        raise ValueError(f"key: the forced provider {provider!r} needs a key tensor: {reason}")

    return refuse
