"""``select_rope``: load this device's tuning table and dispatch each RoPE call by token count.

Lookup, first match wins:

1. Table files, in :func:`kernels.table.table_search_path` order (``$ROPE_AUTOTUNE_CONFIG_DIR``,
   the user config directory, the shipped ``configs/``), the file named by the normalized device
   name (``NVIDIA H200`` -> ``NVIDIA_H200.json``). A bad file is skipped with one warning.
2. In the requested timing mode's entries: the exact spec (:attr:`RopeSpec.key`) in the first
   table that has it; else the nearest spec (same head size, rotary dim, style and element
   size, so bf16 stands in for fp16 and back; closest head counts in log distance, then the
   same dtype, see :func:`kernels._dispatch.nearest_spec_key`) in the
   first table that has one.
3. Else the fallback: Triton's default config on CUDA, ``torch`` on the CPU, with one warning
   naming the command that tunes this device.

Per call, the token count picks the bucket nearest in log scale (boundaries at the geometric
midpoints between the table's buckets) and runs that bucket's provider, bound at selection time.
"""

from __future__ import annotations

import logging
import threading
import warnings
from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import _custom_op
from ._checks import check_rope_args
from ._dispatch import (
    FALLBACK_BUCKETS,
    Route,
    _Availability,
    bucket_thresholds,
    fallback_route,
    nearest_spec_key,
    resolve_entry,
)
from ._spec import RopeSpec
from .providers import get_provider, provider_names
from .table import (
    TIMING_MODES,
    TableError,
    device_metadata,
    device_table_name,
    library_versions,
    read_table,
    table_search_path,
)

__all__ = ["Explanation", "RopeSelector", "RopeTableWarning", "select_rope"]

logger = logging.getLogger(__name__)

_is_compiling = torch.compiler.is_compiling  # one global lookup on the hot path

# Library versions compared with a table's metadata: the ones its measurements depend on.
_VERSIONED_LIBRARIES = ("torch", "triton", "cuda", "flashinfer", "vllm")


class RopeTableWarning(UserWarning):
    """A tuning table was skipped, is stale, or is missing; RoPE still runs (on a fallback)."""


_warned: set[tuple[str, ...]] = set()
_warned_lock = threading.Lock()


def _warn_once(key: tuple[str, ...], message: str, stacklevel: int) -> None:
    """Warn once per process for ``key`` (a serving stack builds many selectors).

    ``stacklevel`` counts from the caller of this function up to ``select_rope``'s caller.
    """
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(message, RopeTableWarning, stacklevel=stacklevel + 1)


@dataclass(frozen=True)
class Explanation:
    """What :class:`RopeSelector` runs for one call, and why.

    Attributes:
        num_tokens: The token count asked about.
        has_key: Whether the call passes a key tensor.
        provider: Provider name.
        config: Its config.
        bucket: The bucket serving ``num_tokens``.
        source: The table file used, or None (fallback, forced provider).
        spec_key: The table's spec entry used (differs from the asked spec for a nearest match).
        why: The full reason, one line.
    """

    num_tokens: int
    has_key: bool
    provider: str
    config: Mapping[str, Any]
    bucket: int
    source: Path | None
    spec_key: str | None
    why: str

    def __str__(self) -> str:
        key = "with key" if self.has_key else "without key"
        return (
            f"{self.num_tokens} tokens ({key}) -> bucket {self.bucket}: {self.provider} "
            f"{dict(self.config)}\n  why: {self.why}"
        )


class RopeSelector:
    """The callable ``select_rope`` returns: ``rope(positions, query, key, cos_sin_cache)``.

    Immutable after construction, so it is safe to share between threads. Per eager call it reads
    ``positions.numel()``, bisects a precomputed tuple of bucket boundaries, and calls that
    bucket's bound provider: no allocation, no host-device sync, nothing captured into a CUDA
    graph but the provider's own kernels. Inside ``torch.compile`` it is the custom op
    ``torch.ops.rope_autotune.rope``. Arguments are not re-checked per call (the providers'
    bound contract); call :meth:`check` once on representative tensors to validate a setup.
    """

    __slots__ = (
        "_fns",
        "_handle",
        "_keyless_fns",
        "_keyless_routes",
        "_routes",
        "_thresholds",
        "buckets",
        "device",
        "source",
        "spec",
        "spec_key",
        "timing",
    )

    def __init__(
        self,
        spec: RopeSpec,
        device: torch.device,
        timing: str,
        buckets: tuple[int, ...],
        routes: tuple[Route, ...],
        keyless_routes: tuple[Route, ...],
        source: Path | None,
        spec_key: str | None,
    ) -> None:
        self.spec, self.device, self.timing = spec, device, timing
        self.buckets, self.source, self.spec_key = buckets, source, spec_key
        self._routes, self._keyless_routes = routes, keyless_routes
        # The hot path's only data: boundaries and callables, in tuples.
        self._thresholds = bucket_thresholds(buckets)
        self._fns = tuple(r.fn for r in routes)
        self._keyless_fns = tuple(r.fn for r in keyless_routes)
        self._handle = _custom_op.register_dispatch(self._dispatch)

    def __call__(
        self,
        positions: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor | None,
        cos_sin_cache: torch.Tensor,
    ) -> None:
        """Rotate ``query`` and ``key`` in place (the providers' contract).

        Args:
            positions: int64 or int32, ``[T]`` or ``[B, S]``.
            query: ``[T, Hq*D]``, ``[T, Hq, D]``, ``[B, S, Hq*D]`` or ``[B, S, Hq, D]`` in the
                spec's dtype; strided views allowed, last dimension contiguous.
            key: The same with ``Hk`` heads, or None.
            cos_sin_cache: ``[max_position, rotary_dim]`` float32 or the query's dtype.
        """
        if _is_compiling():
            # One opaque op in the graph; the token count stays symbolic.
            torch.ops.rope_autotune.rope(positions, query, key, cos_sin_cache, self._handle)
            return
        fns = self._fns if key is not None else self._keyless_fns
        fns[bisect_left(self._thresholds, positions.numel())](positions, query, key, cos_sin_cache)

    def _dispatch(self, positions, query, key, cos_sin_cache) -> None:
        # The custom op's body: the same dispatch as the eager path.
        fns = self._fns if key is not None else self._keyless_fns
        fns[bisect_left(self._thresholds, positions.numel())](positions, query, key, cos_sin_cache)

    def explain(self, num_tokens: int, *, has_key: bool = True) -> Explanation:
        """What a call with ``num_tokens`` tokens runs, and why (``print`` it for a summary).

        Raises:
            ValueError: ``num_tokens`` is not a non-negative int.
        """
        if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens < 0:
            raise ValueError(f"num_tokens: expected a non-negative int, got {num_tokens!r}")
        index = bisect_left(self._thresholds, num_tokens)
        route = (self._routes if has_key else self._keyless_routes)[index]
        return Explanation(
            num_tokens=num_tokens,
            has_key=has_key,
            provider=route.provider,
            config=dict(route.config),
            bucket=self.buckets[index],
            source=self.source,
            spec_key=self.spec_key,
            why=route.why,
        )

    def check(
        self,
        positions: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor | None,
        cos_sin_cache: torch.Tensor,
    ) -> None:
        """Validate one call's arguments against the contract and this selector's spec and device
        (host-side only). The per-call path trusts its caller; run this once at setup.

        Raises:
            TypeError, ValueError: the message names the argument, the expected and the actual.
        """
        spec, _, k_layout = check_rope_args(
            positions, query, key, cos_sin_cache, self.spec.head_size, self.spec.is_neox
        )
        expected = self.spec
        if query.device != self.device:
            raise ValueError(f"query: expected device {self.device}, got {query.device}")
        if spec.dtype != expected.dtype:
            raise TypeError(f"query: expected {expected.dtype}, got {spec.dtype}")
        if spec.num_heads != expected.num_heads:
            raise ValueError(f"query: expected {expected.num_heads} heads, got {spec.num_heads}")
        if k_layout is not None and k_layout[1] != expected.num_kv_heads:
            raise ValueError(f"key: expected {expected.num_kv_heads} heads, got {k_layout[1]}")
        if spec.rotary_dim != expected.rotary_dim:
            raise ValueError(
                f"cos_sin_cache: expected width rotary_dim={expected.rotary_dim}, got "
                f"{spec.rotary_dim}"
            )

    def __repr__(self) -> str:
        return (
            f"RopeSelector({self.spec.key}, device={self.device}, timing={self.timing!r}, "
            f"buckets={len(self.buckets)}, source={self.source})"
        )


# -- selection -------------------------------------------------------------------------------------


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).name
    return device_metadata(device)["device_name"]


def _tune_command(spec: RopeSpec, device: torch.device) -> str:
    style = "--is-neox-style" if spec.is_neox else "--no-is-neox-style"
    return (
        f"python -m autotune --device {device} --head-size {spec.head_size} "
        f"--rotary-dim {spec.rotary_dim} --num-heads {spec.num_heads} "
        f"--num-kv-heads {spec.num_kv_heads} {style} --dtype {spec.dtype_name}"
    )


def _table_files(table_dir: str | Path | None, file_name: str) -> list[Path]:
    if table_dir is not None:
        path = Path(table_dir).expanduser()
        return [path if path.suffix == ".json" else path / file_name]
    return [directory / file_name for directory in table_search_path()]


def _read_tables(paths: list[Path]) -> list[tuple[Path, dict]]:
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
            _warn_once(
                ("bad-table", str(path), fault),
                f"rope-autotune: skipping tuning table {fault}; trying the next source",
                stacklevel=3,
            )
    return tables


def _warn_if_stale(path: Path, table: Mapping[str, Any]) -> None:
    recorded = table["metadata"].get("versions") or {}
    running = library_versions()
    differing = [
        f"{lib} {recorded[lib]} (running {running.get(lib)})"
        for lib in _VERSIONED_LIBRARIES
        if lib in recorded and recorded[lib] != running.get(lib)
    ]
    if differing:
        _warn_once(
            ("stale-table", str(path)),
            f"rope-autotune: tuning table {path} was measured with "
            + ", ".join(differing)
            + "; its entries are still used, re-tune to refresh them",
            stacklevel=3,
        )


def _find_entries(
    tables: list[tuple[Path, dict]], spec: RopeSpec, timing: str
) -> tuple[Path, dict, str] | None:
    """(file, table, spec key) of the exact spec in the first table having it, else of the nearest
    spec in the first table having one, else None."""
    for path, table in tables:
        if spec.key in table["entries"].get(timing, {}):
            return path, table, spec.key
    for path, table in tables:
        key = nearest_spec_key(spec, table["entries"].get(timing, {}))
        if key is not None:
            return path, table, key
    return None


def _forced_routes(
    spec: RopeSpec, device: torch.device, provider: str, config: Mapping[str, Any] | None
) -> tuple[tuple[int, ...], tuple[Route, ...], tuple[Route, ...]]:
    chosen = get_provider(provider)
    reason = chosen.unavailable_reason(device)
    if reason is not None:
        raise ValueError(f"provider: {provider!r} is unavailable on {device}: {reason}")
    buckets = (1,) if config is not None else FALLBACK_BUCKETS
    routes, keyless = [], []
    for bucket in buckets:
        full = chosen.check_config(
            spec, config if config is not None else chosen.default_config(spec, bucket)
        )
        fn = chosen.bound(spec, full)
        why = f"forced: provider={provider!r}" + (f", config={dict(config)}" if config else "")
        routes.append(Route(provider, full, fn, why))
        keyless_reason = chosen.unsupported_reason(spec, has_key=False)
        if keyless_reason is None:
            keyless.append(Route(provider, full, fn, why))
        else:
            keyless.append(Route(provider, full, _refuse_keyless(provider, keyless_reason), why))
    return buckets, tuple(routes), tuple(keyless)


def _refuse_keyless(provider: str, reason: str):
    def refuse(positions, query, key, cos_sin_cache):
        raise ValueError(f"key: the forced provider {provider!r} needs a key tensor: {reason}")

    return refuse


def select_rope(
    head_size: int,
    rotary_dim: int,
    num_heads: int,
    num_kv_heads: int,
    is_neox: bool,
    dtype: torch.dtype | str,
    device: torch.device | str = "cuda",
    *,
    provider: str | None = None,
    config: Mapping[str, Any] | None = None,
    timing: str = "graph",
    table_dir: str | Path | None = None,
) -> RopeSelector:
    """Return the RoPE callable tuned for this spec on ``device``.

    Args:
        head_size: Elements per head ``D``.
        rotary_dim: Leading elements of each head that rotate (even, at most ``D``).
        num_heads: Query heads ``Hq``.
        num_kv_heads: Key heads ``Hk`` (dividing ``Hq``).
        is_neox: NeoX style (rotate halves) or GPT-J style (interleaved pairs).
        dtype: Element type of query and key (``torch.bfloat16``, ``"fp16"``, ...).
        device: Where the calls run (``"cuda:0"``, ``"cpu"``).
        provider: Force this provider for every token count (skips the table).
        config: With ``provider``: force this config too (else the provider's default).
        timing: Which table entries to follow: ``"graph"`` (CUDA graph replay, what serving
            stacks run) or ``"eager"`` (host launch cost included).
        table_dir: Search only this directory (or this ``.json`` file) instead of the search
            path.

    Returns:
        A :class:`RopeSelector`: ``rope(positions, query, key, cos_sin_cache)`` rotates in place;
        ``rope.explain(num_tokens)`` says what runs and why.

    Raises:
        ValueError, TypeError: a bad spec, timing, device, or a forced provider/config that cannot
            run here. A bad or missing table never raises: it warns and falls back.
        KeyError: ``provider`` names no registered provider.
    """
    spec = RopeSpec(head_size, rotary_dim, num_heads, num_kv_heads, is_neox, dtype)
    if timing not in TIMING_MODES:
        raise ValueError(f"timing: expected one of {TIMING_MODES}, got {timing!r}")
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: expected an available device, got {device} (no CUDA)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    if config is not None and provider is None:
        raise ValueError("config: a forced config needs provider= too")

    if provider is not None:
        buckets, routes, keyless = _forced_routes(spec, device, provider, config)
        return RopeSelector(spec, device, timing, buckets, routes, keyless, None, None)

    file_name = device_table_name(_device_name(device))
    found = _find_entries(_read_tables(_table_files(table_dir, file_name)), spec, timing)
    if found is None:
        fallback = "Triton's default config" if device.type == "cuda" else "torch"
        why = f"fallback: no {timing} entry for {spec.key} in any {file_name}"
        _warn_once(
            ("no-table", file_name, spec.key, timing),
            f"rope-autotune: no tuning table entry for {spec.key} ({timing}) on this device "
            f"(looked for {file_name}); using {fallback}. Tune this device with: "
            f"{_tune_command(spec, device)}",
            stacklevel=2,
        )
        buckets = FALLBACK_BUCKETS if device.type == "cuda" else (1,)
        routes = tuple(fallback_route(spec, device, b, True, why) for b in buckets)
        keyless = tuple(fallback_route(spec, device, b, False, why) for b in buckets)
        return RopeSelector(spec, device, timing, buckets, routes, keyless, None, None)

    path, table, spec_key = found
    _warn_if_stale(path, table)
    entries = table["entries"][timing][spec_key]
    buckets = tuple(sorted(int(b) for b in entries))
    match = "exact spec" if spec_key == spec.key else f"nearest spec to {spec.key}"
    unavailable = _Availability(device)
    per_key: dict[bool, list[Route]] = {True: [], False: []}
    for bucket in buckets:
        where = f"{path} entries.{timing}.{spec_key}.{bucket} ({match})"
        for has_key, routes in per_key.items():
            route = resolve_entry(
                spec,
                bucket,
                entries[str(bucket)],
                has_key=has_key,
                unavailable=unavailable,
                where=where,
            )
            if route is None:
                route = fallback_route(
                    spec,
                    device,
                    bucket,
                    has_key,
                    f"{where}: no recorded provider can serve this call here; fallback",
                )
            routes.append(route)
    selector = RopeSelector(
        spec, device, timing, buckets, tuple(per_key[True]), tuple(per_key[False]), path, spec_key
    )
    logger.debug("select_rope %s on %s: %s", spec.key, device, selector)
    return selector
