"""``select_rope``: load this device's tuning table and dispatch each RoPE call by token count.

Lookup, first match wins (:mod:`kernels._lookup`):

1. Table files, in :func:`kernels.table.table_search_path` order (``$ROPE_AUTOTUNE_CONFIG_DIR``,
   the user config directory, the shipped ``configs/``), the file named by the normalized device
   name (``NVIDIA H200`` -> ``NVIDIA_H200.json``). A bad file is skipped with one warning. A GPU
   without a table or model of its own uses the nearest device's (:mod:`kernels.transfer`): its
   tables when it has neither, its model when it has no model; one warning says whose.
2. In the requested timing mode's entries, the exact spec (:attr:`RopeSpec.key`) in the first
   table that has it (eager timing without eager entries takes the graph entries). With a
   performance model for the device (``NVIDIA_H200.model.json`` in the same directories,
   :mod:`kernels._predicted`), token counts between two tuned buckets get the faster predicted
   of the neighbours' winners and the model's own pick.
3. Else, with a model: per bucket, the provider and config the model predicts fastest among
   those available here (``explain()`` says "predicted" and the expected time).
4. Else the nearest spec in a table (same head size, rotary dim, style and element size; closest
   head counts in log distance, see :func:`kernels.nearest_spec_key`), else the untuned
   fallback: the default config of a provider marked for this device type (the Triton kernel
   on CUDA), else the reference provider (``torch``, on the CPU), with one warning naming the
   command that tunes this device (:mod:`kernels._routes`).

With tuning on first use on (``tune="first-use"`` or ``$ROPE_AUTOTUNE_TUNE``), a spec without an
exact entry is measured before step 3 and its entries persisted (:mod:`kernels.first_use`).

Per call, the arguments' metadata is checked against the spec, then the token count picks the
bucket nearest in log scale (boundaries at the geometric midpoints between the table's buckets)
and runs that bucket's provider, built at selection time (:mod:`kernels._routes`).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import _custom_op, first_use
from ._checks import call_checker, check_spec_args
from ._device_data import device_data
from ._lookup import (
    device_traits,
    find_entries,
    read_tables,
    table_files,
    warn_if_stale,
    warn_once,
)
from ._predicted import between_route, predicted_route
from ._routes import (
    FALLBACK_BUCKETS,
    Availability,
    Route,
    bucket_thresholds,
    fallback_buckets,
    fallback_description,
    fallback_route,
    forced_routes,
    resolve_entry,
)
from ._spec import RopeSpec
from .devices import normalize_device
from .perf_model import PerfModel
from .table import TIMING_MODES, RopeTableWarning, device_table_name
from .transfer import transfer_enabled

__all__ = ["Explanation", "RopeSelector", "RopeTableWarning", "select_rope"]

logger = logging.getLogger(__name__)

_is_compiling = torch.compiler.is_compiling  # one global lookup on the hot path


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

    Immutable after construction, so it is safe to share between threads. Per eager call it
    checks the arguments' metadata against the spec (a few integer compares for the common
    layouts, :func:`kernels._checks.call_checker`), bisects a precomputed tuple of bucket
    boundaries, and calls that bucket's provider: no allocation, no host-device sync, nothing
    captured into a CUDA graph but the provider's own kernels. Inside ``torch.compile`` it is
    the custom op ``torch.ops.rope_autotune.rope``, whose body is this same call.
    """

    __slots__ = (
        "_check",
        "_fns",
        "_handle",
        "_keyless_fns",
        "_keyless_routes",
        "_routes",
        "_thresholds",
        "buckets",
        "debug",
        "device",
        "first_use",
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
        *,
        debug: bool = False,
        first_use: str | None = None,
    ) -> None:
        self.spec, self.device, self.timing, self.debug = spec, device, timing, debug
        self.first_use = first_use
        self.buckets, self.source, self.spec_key = buckets, source, spec_key
        self._routes, self._keyless_routes = routes, keyless_routes
        # The hot path's only data: the check, boundaries and callables, in tuples.
        self._check = call_checker(spec, device, debug=debug)
        self._thresholds = bucket_thresholds(buckets)
        self._fns = tuple(r.fn for r in routes)
        self._keyless_fns = tuple(r.fn for r in keyless_routes)
        self._handle = _custom_op.register_dispatch(self.__call__)

    def __call__(
        self,
        positions: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor | None,
        cos_sin_cache: torch.Tensor,
    ) -> None:
        """Rotate ``query`` and ``key`` in place (the providers' contract).

        Args:
            positions: int64 or int32, ``[T]`` or ``[B, S]``, contiguous, on the spec's device;
                each below ``cos_sin_cache.shape[0]`` (checked only in debug mode). For an mRoPE
                spec ``[3, T]`` (last dimension contiguous) or ``[T]`` (text only).
            query: ``[T, Hq*D]``, ``[T, Hq, D]``, ``[B, S, Hq*D]`` or ``[B, S, Hq, D]`` in the
                spec's dtype; strided views allowed, last dimension contiguous.
            key: The same with ``Hk`` heads, or None.
            cos_sin_cache: ``[max_position, rotary_dim]`` float32 or the query's dtype.

        Raises:
            TypeError, ValueError: an argument does not fit the spec, the device or the
                contract; the message names it. Nothing has been written then.
        """
        if _is_compiling():
            # One opaque op in the graph; the token count stays symbolic.
            torch.ops.rope_autotune.rope(positions, query, key, cos_sin_cache, self._handle)
            return
        num_tokens = self._check(positions, query, key, cos_sin_cache)
        fns = self._fns if key is not None else self._keyless_fns
        fns[bisect_left(self._thresholds, num_tokens)](positions, query, key, cos_sin_cache)

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
            why=route.why if self.first_use is None else f"{route.why}; {self.first_use}",
        )

    def check(
        self,
        positions: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor | None,
        cos_sin_cache: torch.Tensor,
    ) -> None:
        """Validate one call's arguments against the contract and this selector's spec and device
        (host-side only; every call runs the same checks, this one also accepts arguments the
        fast path of a call would check more cheaply).

        Raises:
            TypeError, ValueError: the message names the argument, the expected and the actual.
        """
        check_spec_args(self.spec, self.device, positions, query, key, cos_sin_cache)

    def __repr__(self) -> str:
        return (
            f"RopeSelector({self.spec.key}, device={self.device}, timing={self.timing!r}, "
            f"buckets={len(self.buckets)}, source={self.source})"
        )


# -- selection -------------------------------------------------------------------------------------


def _tune_command(spec: RopeSpec, device: torch.device) -> str:
    style = "--is-neox-style" if spec.is_neox else "--no-is-neox-style"
    command = (
        f"python -m autotune --device {device} --head-size {spec.head_size} "
        f"--rotary-dim {spec.rotary_dim} --num-heads {spec.num_heads} "
        f"--num-kv-heads {spec.num_kv_heads} {style} --dtype {spec.dtype_name}"
    )
    if spec.mrope_section is not None:
        command += " --mrope-section " + ",".join(str(s) for s in spec.mrope_section)
        if spec.mrope_interleaved:
            command += " --mrope-interleaved"
    return command


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
    transfer: bool | None = None,
    debug: bool = False,
    tune: str | None = None,
    mrope_section: tuple[int, int, int] | None = None,
    mrope_interleaved: bool = False,
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
        transfer: Whether a GPU without a table or model of its own may use the nearest
            device's (:mod:`kernels.transfer`); None: ``$ROPE_AUTOTUNE_TRANSFER`` decides (on
            unless ``0``/``off``). Off, such a GPU runs the untuned fallback.
        debug: Also check on every call that each position indexes a row of the cache: reads
            the positions, so a host-device sync per call (and no CUDA graph capture). For
            finding a bad caller, not for serving.
        tune: ``"first-use"``: when the tables have no entry for this exact spec (in
            ``timing``'s entries), measure a few candidates per token bucket now and write the
            winners to the user table directory (``table_dir``'s table when given), so the next
            process starts tuned (:mod:`kernels.first_use`; seconds per spec on a GPU, skipped
            inside CUDA graph capture and ``torch.compile`` tracing). ``"off"``: never. None:
            as ``$ROPE_AUTOTUNE_TUNE`` says (off when unset).
        mrope_section: Multimodal RoPE (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): how many of the
            ``rotary_dim // 2`` frequencies take their angle from the time, height and width
            position streams, e.g. ``(16, 24, 24)``; calls then pass positions ``[3, T]`` (or
            ``[T]``, text only). None for plain RoPE.
        mrope_interleaved: The sections interleave ``THWTHW...`` (Qwen3-VL) instead of lying
            in contiguous chunks (:func:`kernels.mrope_stream_map`).

    Returns:
        A :class:`RopeSelector`: ``rope(positions, query, key, cos_sin_cache)`` rotates in place;
        ``rope.explain(num_tokens)`` says what runs and why.

    Raises:
        ValueError, TypeError: a bad spec, timing, device, ``tune``, or a forced provider/config
            that cannot run here. A bad or missing table, or a failed tuning, never raises: it
            warns and falls back.
        KeyError: ``provider`` names no registered provider.
    """
    spec = RopeSpec(
        head_size, rotary_dim, num_heads, num_kv_heads, is_neox, dtype,
        mrope_section=mrope_section, mrope_interleaved=mrope_interleaved,
    )  # fmt: skip
    if timing not in TIMING_MODES:
        raise ValueError(f"timing: expected one of {TIMING_MODES}, got {timing!r}")
    device = normalize_device(device)
    if config is not None and provider is None:
        raise ValueError("config: a forced config needs provider= too")
    tuning = first_use.tune_mode(tune)

    if provider is not None:
        buckets, routes, keyless = forced_routes(spec, device, provider, config)
        return RopeSelector(spec, device, timing, buckets, routes, keyless, None, None, debug=debug)

    this = device_traits(device)
    file_name = device_table_name(this.name)
    tables = read_tables(table_files(table_dir, file_name))  # warns naming select_rope's caller
    data = device_data(table_dir, this, device, file_name, tables, transfer_enabled(transfer))
    tables, model = data.tables, data.model
    if spec.is_mrope:
        # The model's features do not describe a multimodal layout (its cos/sin reads): mRoPE
        # specs follow their table entries, the nearest tuned mRoPE spec, or the fallback.
        data = dataclasses.replace(data, model=None)
        model = None
    found = _find_entries(tables, spec, timing, nearest=model is None)
    note = None
    if tuning is not None:
        if found is not None and found[2] == spec.key and data.table_from is None:
            note = "first-use tuning not needed: the table has this spec"
        else:  # no exact entry of this device's own (another device's may stand in)
            tuned, note = _first_use(spec, device, timing, table_dir, file_name, model)
            tuned_found = _find_entries(tuned, spec, timing, nearest=False)
            if tuned_found is not None:
                data = dataclasses.replace(data, tables=tuned, table_from=None)
                tables, found = tuned, tuned_found
    unavailable = Availability(device)
    if found is not None:
        path, table, spec_key, used = found
        warn_if_stale(path, table)
        exact = model if spec_key == spec.key else None
        routes, keyless = _table_routes(
            spec, device, table, spec_key, used, path, exact, data.table_note
        )
        buckets = tuple(sorted(routes))
        selector = RopeSelector(
            spec,
            device,
            timing,
            buckets,
            tuple(routes[b] for b in buckets),
            tuple(keyless[b] for b in buckets),
            path,
            spec_key,
            debug=debug,
            first_use=note,
        )
    elif model is not None:
        why = f"no {timing} entry for {spec.key} in {data.looked_in(file_name)}"
        routes, keyless = [], []
        for bucket in FALLBACK_BUCKETS:
            for has_key, out in ((True, routes), (False, keyless)):
                route = predicted_route(model, spec, bucket, has_key, unavailable)
                out.append(route or fallback_route(spec, device, bucket, has_key, why))
        logger.info(
            "select_rope %s on %s: %s; predicted by %s", spec.key, device, why, model.source
        )
        selector = RopeSelector(
            spec, device, timing, FALLBACK_BUCKETS, tuple(routes), tuple(keyless),
            model.source, None, debug=debug, first_use=note,
        )  # fmt: skip
    else:
        fallback = fallback_description(device)
        why = f"fallback: no {timing} entry for {spec.key} in {data.looked_in(file_name)}"
        not_used = f"; other devices' data not used: {data.refused}" if data.refused else ""
        warn_once(
            ("no-table", file_name, spec.key, timing),
            f"rope-autotune: no tuning table entry for {spec.key} ({timing}) on this device "
            f"(looked for {file_name}{not_used}); using {fallback}. Tune this device with: "
            f"{_tune_command(spec, device)}",
            stacklevel=2,
        )
        why += not_used
        buckets = fallback_buckets(device)
        routes = tuple(fallback_route(spec, device, b, True, why) for b in buckets)
        keyless = tuple(fallback_route(spec, device, b, False, why) for b in buckets)
        selector = RopeSelector(
            spec, device, timing, buckets, routes, keyless, None, None, debug=debug,
            first_use=note,
        )  # fmt: skip
    logger.debug("select_rope %s on %s: %s", spec.key, device, selector)
    return selector


def _first_use(
    spec: RopeSpec,
    device: torch.device,
    timing: str,
    table_dir: str | Path | None,
    file_name: str,
    model: PerfModel | None,
) -> tuple[list[tuple[Path, dict]], str]:
    """Tune ``spec`` on first use (:func:`kernels.first_use.tune_on_first_use`), then the tables
    to select from (read again; a tuning that could not be written comes first) and the note
    for ``explain()``."""
    paths = table_files(table_dir, file_name)

    def tuned_already() -> bool:
        return _find_entries(read_tables(paths), spec, timing, nearest=False) is not None

    target = first_use.target_path(table_dir, file_name)
    done = first_use.tune_on_first_use(spec, device, timing, target, model, tuned_already)
    tables = read_tables(paths)
    if done.unwritten is not None:
        tables.insert(0, (target, done.unwritten))
    return tables, done.note


def _find_entries(
    tables: list[tuple[Path, dict]], spec: RopeSpec, timing: str, *, nearest: bool
) -> tuple[Path, dict, str, str] | None:
    """(file, table, spec key, timing mode used): the spec in ``timing``'s entries; for eager
    timing without eager entries, the graph entries (the table holds graph entries first);
    with ``nearest``, the nearest spec after that."""
    modes = (timing, "graph") if timing == "eager" else (timing,)
    for allow_nearest in (False, True) if nearest else (False,):
        for mode in modes:
            found = find_entries(tables, spec, mode, nearest=allow_nearest)
            if found is not None:
                return (*found, mode)
    return None


def _table_routes(
    spec: RopeSpec,
    device: torch.device,
    table: Mapping[str, Any],
    spec_key: str,
    timing: str,
    path: Path,
    model: PerfModel | None,
    note: str | None = None,
) -> tuple[dict[int, Route], dict[int, Route]]:
    """Routes per bucket (with a key, without one) from a table's entries for ``spec_key``; with
    ``model``, also for the power-of-two token counts between the tuned buckets. ``note`` (a
    transferred table's origin) is added to each entry's place in ``why``."""
    entries = table["entries"][timing][spec_key]
    tuned = sorted(int(b) for b in entries)
    match = "exact spec" if spec_key == spec.key else f"nearest spec to {spec.key}"
    if note:
        match += f"; {note}"
    unavailable = Availability(device)
    routes: dict[int, Route] = {}
    keyless: dict[int, Route] = {}
    for bucket in tuned:
        where = f"{path} entries.{timing}.{spec_key}.{bucket} ({match})"
        for has_key, out in ((True, routes), (False, keyless)):
            route = resolve_entry(
                spec, bucket, entries[str(bucket)], has_key=has_key, unavailable=unavailable,
                where=where,
            ) or fallback_route(
                spec, device, bucket, has_key,
                f"{where}: no recorded provider can serve this call here; fallback",
            )  # fmt: skip
            out[bucket] = route
    if model is None:
        return routes, keyless
    for lower, upper in itertools.pairwise(tuned):
        neighbours = {lower: entries[str(lower)], upper: entries[str(upper)]}
        for bucket in (b for b in FALLBACK_BUCKETS if lower < b < upper):
            for has_key, out in ((True, routes), (False, keyless)):
                route = between_route(model, spec, bucket, neighbours, has_key, unavailable)
                if route is not None:
                    out[bucket] = route
                else:  # the tuned bucket nearest in log scale
                    out[bucket] = out[lower if bucket * bucket <= lower * upper else upper]
    return routes, keyless
