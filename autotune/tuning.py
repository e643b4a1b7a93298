"""The tuner's Python API: :func:`tune` runs the studies for a set of specs and token buckets on
one device and returns (and optionally writes) the device's table."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial

from kernels import RopeSpec, provider_names
from kernels.perf_model import find_model
from kernels.table import (
    TIMING_MODES,
    check_output_dir,
    check_table_target,
    device_metadata,
    empty_table,
)

from ._device import resolve_device
from ._preflight import MAX_SEED
from .distributed import DEFAULT_GRACE_S, run_worker
from .export import build_tables, write_device_table
from .models import DEFAULT_TOKENS, MAX_TOKENS
from .objective import Objective
from .processes import WorkerJob, check_devices, run_processes
from .progress import Progress
from .report import write_measurements_csv
from .runner import StudyRunner
from .stop import StopAfterTrial
from .storage import default_storage_path, open_storage
from .studies import StudyKey, device_tag
from .warm_start import model_candidates

__all__ = ["CPU_DEFAULT_TRIALS", "DEFAULT_TRIALS", "WARM_DEFAULT_TRIALS", "tune"]

logger = logging.getLogger(__name__)

# Trials per (spec, bucket, timing) study. Large enough to beat the default config across
# ~1000 valid Triton configs (benchmarks/search_vs_exhaustive.py measures how close it gets).
DEFAULT_TRIALS = 48
# Trials per study when the device has a performance model: each study first measures the
# model's best predicted Triton configs (after every provider's default, see
# autotune.warm_start), which reach within 2% of a 48-trial search in most buckets
# (docs/DESIGN.md#trial-budget).
WARM_DEFAULT_TRIALS = 16
# On the CPU only the untunable providers run (Triton needs the interpreter there): the study
# is exhausted in a handful of trials anyway.
CPU_DEFAULT_TRIALS = 16


def tune(
    specs: Iterable[RopeSpec],
    tokens: Iterable[int] = DEFAULT_TOKENS,
    *,
    device: torch.device | str | None = None,
    providers: Iterable[str] | None = None,
    trials: int | None = None,
    timing: str | Iterable[str] = "graph",
    storage: str | os.PathLike | optuna.storages.BaseStorage | None = None,
    output: str | os.PathLike | None = None,
    save_path: str | os.PathLike | None = None,
    seed: int | None = None,
    progress: bool = True,
    callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]] = (),
    time_kwargs: Mapping[str, Any] | None = None,
    devices: Sequence[torch.device | str] | None = None,
    claim_grace_s: float = DEFAULT_GRACE_S,
    warm_start: bool = True,
) -> dict[str, Any]:
    """Tune RoPE for ``specs`` at every token count in ``tokens`` on one device.

    Runs one Optuna study per (timing mode, spec, token bucket) to ``trials`` counted trials
    (resuming studies already in ``storage``), then builds the device's table from the
    finished studies. Ctrl-C or SIGTERM stops after the trial in flight (a second one at once,
    failing it); what is finished is still written, and calling again with the same arguments
    resumes.

    With ``devices``, one worker process per device shares the studies through ``storage``
    (see :mod:`autotune.distributed`); other hosts may run the same call on the same RDB
    storage at the same time.

    Args:
        specs: Shapes to tune.
        tokens: Token buckets (positive ints).
        device: ``"cuda:0"``, ``"cpu"``...; None for the first CUDA device, else the CPU.
        providers: Provider names to search; None for every registered one. Those unavailable
            on ``device`` or not supporting a spec are left out for it.
        trials: Counted trials per study; None for :data:`WARM_DEFAULT_TRIALS` when the device
            has a performance model and ``warm_start``, else :data:`DEFAULT_TRIALS` on CUDA and
            :data:`CPU_DEFAULT_TRIALS` on the CPU.
        timing: ``"graph"`` (CUDA graph replay), ``"eager"`` (host wall time per call), or
            both.
        storage: An Optuna storage URL (``postgresql://...``), a journal file path, a storage
            object, or None for the default journal file in the user cache directory.
        output: Directory to merge the table into (``<device name>.json``); None to not write.
            Checked before tuning unless it is a :class:`kernels.table.OutputDir`.
        save_path: Directory for ``<device>.csv``, every trial of these studies; None for none.
            Checked like ``output``.
        seed: Seeds the samplers and the random inputs; None for fresh randomness.
        progress: Show a progress bar with ETA.
        callbacks: Extra Optuna trial callbacks, called after each trial.
        time_kwargs: Extra arguments to :func:`kernels.measure.time_rope` (e.g. fewer
            ``repeats`` for a quick run).
        devices: Run one worker process per device instead (``["cuda:0", "cuda:1"]``, or
            ``["cpu", "cpu"]``); all of one device type, since they fill one table. Not with
            ``device``, ``callbacks`` or a storage object (workers open ``storage`` themselves).
        claim_grace_s: Seconds without a heartbeat after which another worker takes over a
            study (at once when the owner was on this host and its process is gone).
        warm_start: Start each new study with the Triton configs the device's performance
            model (``<device>.model.json`` where ``select_rope`` finds tables; for a GPU without
            one, the nearest measured GPU's, as :mod:`kernels.transfer` chooses) predicts
            fastest.

    Returns:
        The table of this run's finished studies (schema of :mod:`kernels.table`): its
        ``"entries"`` map mode -> spec key -> token bucket -> entry.

    Raises:
        DeviceError: a CUDA device was asked for and there is none.
        ValueError: an argument is invalid (the message names it).
        KeyboardInterrupt: interrupted; finished studies were written first.
    """
    specs = list(dict.fromkeys(specs))
    buckets = sorted(set(tokens))
    if not specs:
        raise ValueError("specs: expected at least one RopeSpec")
    if not buckets or any(not _is_int(t) or not 0 < t <= MAX_TOKENS for t in buckets):
        raise ValueError(f"tokens: expected ints from 1 to {MAX_TOKENS}, got {buckets!r}")
    timings = [timing] if isinstance(timing, str) else list(dict.fromkeys(timing))
    if not timings or any(m not in TIMING_MODES for m in timings):
        raise ValueError(f"timing: expected {' or '.join(TIMING_MODES)}, got {timing!r}")
    providers = list(provider_names() if providers is None else providers)
    unknown = sorted(set(providers) - set(provider_names()))
    if unknown or not providers:
        raise ValueError(f"providers: expected names from {provider_names()}, got {providers}")
    if seed is not None and (not _is_int(seed) or not 0 <= seed <= MAX_SEED):
        raise ValueError(f"seed: expected an int from 0 to {MAX_SEED}, got {seed!r}")
    # Where results go is checked before any tuning time is spent, once (an OutputDir that a
    # command line checked is not checked again).
    if output is not None:
        output = check_output_dir(output, "output")
    if save_path is not None:
        save_path = check_output_dir(save_path, "save_path")
    if devices is not None:
        if device is not None or callbacks or isinstance(storage, optuna.storages.BaseStorage):
            raise ValueError("devices: not with device, callbacks or a storage object")
        worker_devices = check_devices(devices)
        device = worker_devices[0]
    device = resolve_device(device)
    model = find_model(None, device, transfer=True) if warm_start else None
    if model is not None and model.transfer is not None:
        logger.info("warm start: %s", model.transfer)
    if trials is None:
        if device.type != "cuda":
            trials = CPU_DEFAULT_TRIALS
        else:
            trials = DEFAULT_TRIALS if model is None else WARM_DEFAULT_TRIALS
    if not _is_int(trials) or trials <= 0:
        raise ValueError(f"trials: expected a positive int, got {trials!r}")
    storage_url = storage
    if not isinstance(storage, optuna.storages.BaseStorage):
        storage_url = str(default_storage_path() if storage is None else storage)
        storage = open_storage(storage_url)
    metadata = device_metadata(device)
    device_name = metadata["device_name"]
    if output is not None:  # say before tuning what merging into the existing table drops
        target = check_table_target(output, device_name, provider_names())
        if target.unreadable or target.dropped:
            logger.warning(
                "%s: %s; the run's table will be merged into what is valid",
                target.path,
                target.unreadable or f"invalid entries {', '.join(target.dropped)}",
            )

    progress_bar = Progress(progress)
    stop = StopAfterTrial(enabled=devices is None)  # worker processes handle their own
    time_kwargs = dict(time_kwargs or {})
    runner = StudyRunner(
        storage,
        Objective(device, seed, time_kwargs),
        metadata,
        trials,
        seed,
        callbacks=[progress_bar.on_trial, stop.after_trial, *callbacks],
        first_candidates=None if model is None else model_candidates(model),
    )
    keys = _study_keys(runner, specs, buckets, timings, providers)
    progress_bar.start(sum(runner.remaining(k) for k in keys))
    interrupted = False
    try:
        with progress_bar, stop:
            if devices is None:
                run_worker(runner, keys, grace_s=claim_grace_s, on_study=progress_bar.describe)
            else:
                level = logging.getLogger("autotune").getEffectiveLevel()
                jobs = [
                    WorkerJob(
                        index,
                        len(worker_devices),
                        str(d),
                        keys,
                        storage_url,
                        trials,
                        seed,
                        time_kwargs,
                        claim_grace_s,
                        level,
                        warm_start,
                    )
                    for index, d in enumerate(worker_devices)
                ]
                run_processes(jobs, runner, progress_bar)
    except KeyboardInterrupt:
        interrupted = True
        logger.warning("interrupted: writing finished studies; run the same command to resume")
    names = [k.name for k in keys]
    table = build_tables(storage, study_names=names).get(device_name) or empty_table(metadata)
    if output is not None and any(table["entries"].values()):
        path = write_device_table(output, table)
        logger.info("table written: %s", path)
    if save_path is not None:
        path = write_measurements_csv(
            storage, names, Path(save_path) / f"{device_tag(device_name)}.csv"
        )
        logger.info("measurements written: %s", path)
    if interrupted:
        raise KeyboardInterrupt
    return table


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _study_keys(
    runner: StudyRunner,
    specs: Sequence[RopeSpec],
    buckets: Sequence[int],
    timings: Sequence[str],
    providers: Sequence[str],
) -> list[StudyKey]:
    """Every study to run, spec-major (a spec's kernels compile once, then serve every bucket).
    Specs no asked provider can run here are skipped with a warning."""
    keys = []
    for spec in specs:
        try:
            space = runner.space(spec, providers)
        except ValueError as exc:
            logger.warning("skipping %s: %s", spec.key, exc)
            continue
        for timing in timings:
            for tokens in buckets:
                keys.append(runner.key(timing, spec, tokens, space.providers))
    if not keys:
        raise ValueError(f"providers: none of {list(providers)} can run any asked spec here")
    return keys
