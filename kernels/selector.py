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
and runs that bucket's provider, built at selection time (:mod:`kernels._routes`; the callable
is :mod:`kernels._dispatch`).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from . import first_use
from ._device_data import device_data
from ._dispatch import Explanation, RopeSelector
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
            stacks run) or ``"eager"`` (host launch cost included; the graph entries where the
            tables have no eager ones for the spec). The selector's ``timing`` says which it
            follows.
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
    data = device_data(table_dir, this, device, file_name, tables, transfer_enabled(transfer), spec)
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
            used,
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
            spec, device, "graph", FALLBACK_BUCKETS, tuple(routes), tuple(keyless),
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
            spec, device, "graph", buckets, routes, keyless, None, None, debug=debug,
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
