"""Tables from studies: the tuner writes its table with this, and so does ``export``.

Every study records what it tunes in its user attributes (device name, timing mode, spec key,
token bucket, the device's metadata header), so a table can be built from the storage alone,
on any machine, while workers are still running.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from kernels import provider_names
from kernels.table import TableEntry, device_table_name, empty_table, merge_into_table

from .studies import StudyKey, is_complete, measured_trials

__all__ = ["best_entry", "build_tables", "export_model", "export_tables", "write_device_table"]

logger = logging.getLogger(__name__)


def best_entry(trials: Iterable[optuna.trial.FrozenTrial]) -> TableEntry | None:
    """The table entry for one bucket from its measured trials, or None when none was measured.

    Only trials that passed the correctness gate and were timed (``outcome`` ``measured``)
    count; failed, pruned and duplicate trials never win.
    """
    best: optuna.trial.FrozenTrial | None = None
    providers_us: dict[str, float] = {}
    for trial in measured_trials(trials):
        attrs = trial.user_attrs
        provider, median = attrs["provider"], float(attrs["median_us"])
        providers_us[provider] = min(median, providers_us.get(provider, median))
        if best is None or median < float(best.user_attrs["median_us"]):
            best = trial
    if best is None:
        return None
    attrs = best.user_attrs
    return TableEntry(
        provider=attrs["provider"],
        config=dict(attrs.get("config") or {}),
        median_us=float(attrs["median_us"]),
        p20_us=float(attrs["p20_us"]),
        p80_us=float(attrs["p80_us"]),
        providers_us=dict(sorted(providers_us.items())),
    )


def build_tables(
    storage: optuna.storages.BaseStorage,
    *,
    study_names: Iterable[str] | None = None,
    include_partial: bool = False,
) -> dict[str, dict[str, Any]]:
    """Tables built from the studies in ``storage``, one per device name.

    Studies of the same device, mode, spec and bucket (run with different provider sets) are
    combined: their measured trials compete together. Studies that timed a provider at an
    older revision than the registered one are left out (their kernel no longer runs).

    Args:
        storage: The Optuna storage.
        study_names: Only these studies; None for every rope-autotune study.
        include_partial: Also use studies that have not reached their trial budget.

    Returns:
        ``{device_name: table}`` in the schema of :mod:`kernels.table` (not yet validated).
    """
    wanted = None if study_names is None else set(study_names)
    groups: dict[tuple[str, str, str, int], list[optuna.trial.FrozenTrial]] = {}
    metadata: dict[str, Mapping[str, Any]] = {}
    for study in storage.get_all_studies():
        attrs = study.user_attrs
        if wanted is not None and study.study_name not in wanted:
            continue
        key = StudyKey.from_attrs(attrs)
        if key is None:
            continue
        stale = key.stale()
        if stale:
            logger.debug("%s: left out, it timed %s", study.study_name, ", ".join(stale))
            continue
        trials = storage.get_all_trials(study._study_id, deepcopy=False)
        if not (include_partial or is_complete(attrs, trials)):
            continue
        trials = [t for t in trials if t.state == TrialState.COMPLETE]
        device_name = key.device_name
        meta = attrs.get("metadata") or {"device_name": device_name}
        if device_name not in metadata or meta.get("updated", "") > metadata[device_name].get(
            "updated", ""
        ):
            metadata[device_name] = meta
        group = (device_name, key.timing, key.spec.key, key.tokens)
        groups.setdefault(group, []).extend(trials)
        # "updated" is when the newest measurement was taken: a study resumed with a larger
        # budget keeps the metadata of its creation.
        finished = [t.datetime_complete for t in trials if t.datetime_complete is not None]
        if finished:
            newest = max(finished).astimezone(_dt.timezone.utc).isoformat(timespec="seconds")
            if newest > metadata[device_name].get("updated", ""):
                metadata[device_name] = {**metadata[device_name], "updated": newest}

    tables: dict[str, dict[str, Any]] = {}
    for (device_name, timing, spec_key, tokens), trials in sorted(groups.items()):
        entry = best_entry(trials)
        if entry is None:
            continue
        table = tables.setdefault(device_name, empty_table(metadata[device_name]))
        buckets = table["entries"].setdefault(timing, {}).setdefault(spec_key, {})
        buckets[str(tokens)] = entry.to_json()
    return tables


def write_device_table(output: str | os.PathLike, table: Mapping[str, Any]) -> Path:
    """Merge ``table`` into its device's file under ``output``, atomically and under the
    table's lock (see :func:`kernels.table.merge_into_table`): entries of the existing file that
    ``table`` does not re-tune are kept, invalid ones dropped with a warning naming them, and a
    file that cannot be read at all is kept aside as ``<name>.bad-<time>``."""
    path = Path(output) / device_table_name(table["metadata"]["device_name"])
    return merge_into_table(path, table, provider_names())


def export_tables(
    storage: optuna.storages.BaseStorage,
    output: str | os.PathLike,
    *,
    study_names: Iterable[str] | None = None,
    include_partial: bool = False,
    models: bool = True,
) -> dict[str, Path]:
    """Build the tables of ``storage``'s studies and merge each into its device's file; with
    ``models``, also fit each device's performance model on the storage and write it beside.

    Returns:
        ``{device_name: path written}``.
    """
    written = {}
    for device_name, table in build_tables(
        storage, study_names=study_names, include_partial=include_partial
    ).items():
        written[device_name] = write_device_table(output, table)
        logger.info("wrote %s", written[device_name])
        if models:
            try:
                logger.info("wrote %s", export_model(storage, output, table["metadata"]))
            except ValueError as exc:  # too few measurements to fit: the table stands alone
                logger.warning("%s: performance model not written: %s", device_name, exc)
    return written


def export_model(
    storage: optuna.storages.BaseStorage, output: str | os.PathLike, metadata: Mapping[str, Any]
) -> Path:
    """Fit the device's performance model (:mod:`kernels.perf_model`) on every current graph
    measurement in ``storage`` and write it beside the table (``<device>.model.json``)."""
    from kernels.perf_model import model_file_name

    from .perf_model_fit import fit_model, measurements_from_storage, write_model

    device_name = metadata["device_name"]
    rows, _ = measurements_from_storage(storage, device_name=device_name)
    return write_model(Path(output) / model_file_name(device_name), fit_model(rows, metadata))
