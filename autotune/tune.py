"""The tuner's Python API: :func:`tune` runs the studies for a set of specs and token buckets on
one device and returns (and optionally writes) the device's table."""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
import orjson
import torch
from optuna.trial import FrozenTrial, TrialState

from kernels import RopeSpec, provider_names
from kernels.table import TIMING_MODES, device_metadata, empty_table

from ._device import DeviceError, resolve_device
from .distributed import DEFAULT_GRACE_S, run_worker
from .export import build_tables, write_device_table
from .models import DEFAULT_TOKENS
from .precompile import TritonPrecompiler
from .search import (
    COUNTED_OUTCOMES,
    StudyKey,
    StudyRunner,
    default_storage_path,
    device_tag,
    open_storage,
)

__all__ = [
    "CPU_DEFAULT_TRIALS",
    "DEFAULT_TRIALS",
    "DeviceError",
    "default_compile_workers",
    "format_summary",
    "resolve_device",
    "tune",
    "write_measurements_csv",
]

logger = logging.getLogger(__name__)

# Trials per (spec, bucket, mode) study. Large enough to beat the default config across
# ~1000 valid Triton configs (benchmarks/search_vs_exhaustive.py measures how close it gets).
DEFAULT_TRIALS = 48
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
    compile_workers: int | None = None,
    compile_overlap: bool = False,
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
        trials: Counted trials per study; None for :data:`DEFAULT_TRIALS` on CUDA and
            :data:`CPU_DEFAULT_TRIALS` on the CPU.
        timing: ``"graph"`` (CUDA graph replay), ``"eager"`` (host wall time per call), or
            both.
        storage: An Optuna storage URL (``postgresql://...``), a journal file path, a storage
            object, or None for the default journal file in the user cache directory.
        output: Directory to merge the table into (``<device name>.json``); None to not write.
        save_path: Directory for ``<device>.csv``, every trial of these studies; None for none.
        seed: Seeds the samplers and the random inputs; None for fresh randomness.
        progress: Show a progress bar with ETA.
        callbacks: Extra Optuna trial callbacks, called after each trial.
        time_kwargs: Extra arguments to :func:`autotune.measure.time_rope` (e.g. fewer
            ``repeats`` for a quick run).
        devices: Run one worker process per device instead (``["cuda:0", "cuda:1"]``, or
            ``["cpu", "cpu"]``); all of one device type, since they fill one table. Not with
            ``device``, ``callbacks`` or a storage object (workers open ``storage`` themselves).
        claim_grace_s: Seconds without a heartbeat after which another worker takes over a
            study (at once when the owner was on this host and its process is gone).
        compile_workers: On CUDA, processes that compile the Triton configs of the next
            trials (up to 16 new configs asked at once) in parallel before they are timed; 0
            compiles each in its own trial; None for :func:`default_compile_workers`. Per
            tuning process (``devices`` starts one per device).
        compile_overlap: With compile workers, ask the next batch of trials and compile it
            while the current one is timed (the workers, at a lower priority, then share the
            CPU with the measurements, and compile without launching); False waits for each
            batch's compiles. On the H200, configs timed while launching workers compile read
            2.5-7% faster at 1-256 tokens, while compile-only workers leave the timings within
            0.4% (``benchmarks/overlap_check.py``). Off by default until a tuning stretch
            measures what it saves.

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
    if not buckets or any(not isinstance(t, int) or t <= 0 for t in buckets):
        raise ValueError(f"tokens: expected positive ints, got {buckets!r}")
    modes = [timing] if isinstance(timing, str) else list(dict.fromkeys(timing))
    if not modes or any(m not in TIMING_MODES for m in modes):
        raise ValueError(f"timing: expected {' or '.join(TIMING_MODES)}, got {timing!r}")
    providers = list(provider_names() if providers is None else providers)
    unknown = sorted(set(providers) - set(provider_names()))
    if unknown or not providers:
        raise ValueError(f"providers: expected names from {provider_names()}, got {providers}")
    if devices is not None:
        worker_devices = _check_devices(devices, device, callbacks, storage)
        device = worker_devices[0]
    device = resolve_device(device)
    if trials is None:
        trials = DEFAULT_TRIALS if device.type == "cuda" else CPU_DEFAULT_TRIALS
    if not isinstance(trials, int) or trials <= 0:
        raise ValueError(f"trials: expected a positive int, got {trials!r}")
    if compile_workers is None:
        compile_workers = default_compile_workers(device, len(devices or [device]))
    if not isinstance(compile_workers, int) or compile_workers < 0:
        raise ValueError(f"compile_workers: expected an int >= 0, got {compile_workers!r}")
    storage_url = storage
    if not isinstance(storage, optuna.storages.BaseStorage):
        storage_url = str(default_storage_path() if storage is None else storage)
        storage = open_storage(storage_url)
    metadata = device_metadata(device)
    device_name = metadata["device_name"]

    progress_bar = _Progress(progress)
    stop = _StopAfterTrial(enabled=devices is None)  # worker processes handle their own
    runner = StudyRunner(
        storage,
        device,
        device_name,
        metadata,
        trials,
        seed,
        callbacks=[progress_bar.on_trial, stop.after_trial, *callbacks],
        time_kwargs=dict(time_kwargs or {}),
    )
    keys = _study_keys(runner, specs, buckets, modes, providers)
    progress_bar.start(sum(runner.remaining(k) for k in keys))
    interrupted = False
    try:
        with progress_bar, stop:
            if devices is None:
                with _ahead_of_time_compiling(runner, compile_workers, compile_overlap):
                    run_worker(runner, keys, grace_s=claim_grace_s, on_study=progress_bar.describe)
            else:
                _run_processes(
                    worker_devices,
                    runner,
                    keys,
                    storage_url,
                    claim_grace_s,
                    progress_bar,
                    compile_workers,
                    compile_overlap,
                )
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


# New measurements asked from the sampler before any is told when compiling ahead (invalid and
# repeated proposals come on top and need no compile): replaying the sampler on recorded H200
# sweeps, batches of 4, 8 and 16 found configs as good as one trial at a time did
# (benchmarks/results/search_replay_batch*.txt).
_COMPILE_BATCH = 16


def default_compile_workers(device: torch.device | str, processes: int = 1) -> int:
    """Compile workers per tuning process when not given: on CUDA one per spare CPU core
    (shared among ``processes``), at most one per new config of a batch; none elsewhere.

    On the H200, a Triton config's first call takes 183-228 ms (median) when it compiles and
    1.4-2.1 ms when the workers compiled it (``benchmarks/first_call.py``). The pool compiles
    3.6 configs/s with one worker and 11.6 with 15 (``benchmarks/pool_throughput.py``), so
    batches of 13-15 new configs wait 0.75-0.93 s (median) for their compiles (the tuning
    journal, NOTES "Session 9").
    """
    if torch.device(device).type != "cuda":
        return 0
    spare = max(0, (os.cpu_count() or 1) - processes)
    return min(_COMPILE_BATCH, spare // max(1, processes))


@contextlib.contextmanager
def _ahead_of_time_compiling(
    runner: StudyRunner, workers: int, overlap: bool = False
) -> Iterator[None]:
    """Give ``runner`` a pool compiling its next trials' Triton configs (on CUDA, when
    ``workers`` > 0), while it times the batch before them with ``overlap``, and stop the pool
    afterwards."""
    if workers == 0 or runner.device.type != "cuda":
        yield
        return
    # Workers that launch while the tuner times make its timings read faster (their GPU work:
    # compile-only and CPU-only loads do not, benchmarks/overlap_check.py): overlapping
    # workers only compile, and the timed launch loads their kernels all the same.
    with TritonPrecompiler(runner.device, workers, launch=not overlap) as precompiler:
        runner.precompile, runner.batch = precompiler, min(workers, _COMPILE_BATCH)
        runner.overlap = overlap
        try:
            yield
        finally:
            runner.precompile, runner.batch, runner.overlap = None, 1, False


# Signals that stop an in-process run after the trial in flight: Ctrl-C, and what a job
# scheduler or ``timeout`` sends.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _StopAfterTrial:
    """Stop handling for an in-process run: the first SIGINT or SIGTERM lets the trial in flight
    finish (a KeyboardInterrupt raised mid-measurement could land inside CUDA graph capture,
    leaving the CUDA context unusable), then stops through the usual KeyboardInterrupt path, so
    the finished studies are written; a second signal stops at once. Only the main thread can
    own the handlers; elsewhere nothing changes.

    The handlers are installed again after every trial: a provider's library is loaded by its
    first trial, and one that installs its own handler would otherwise turn the stop into a kill
    that writes nothing.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.requested = False
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> _StopAfterTrial:
        if self.enabled and threading.current_thread() is threading.main_thread():
            for sig in _STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning(
            "%s: stopping after the trial in flight (again to stop at once)",
            signal.Signals(signum).name,
        )

    def after_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self.requested:
            raise KeyboardInterrupt
        for sig in self._previous:
            current = signal.getsignal(sig)
            if current != self._on_signal:
                logger.warning(
                    "%s: a library replaced the tuner's handler with %r; installing it again",
                    sig.name,
                    current,
                )
            # Unconditionally: a handler installed from C is invisible to getsignal().
            signal.signal(sig, self._on_signal)


def _check_devices(devices, device, callbacks, storage) -> list[torch.device]:
    """The worker devices, after checking they fit together.

    Raises:
        ValueError: a conflicting argument, two workers on one GPU, or devices of different
            names (they would need different tables).
    """
    if device is not None or callbacks or isinstance(storage, optuna.storages.BaseStorage):
        raise ValueError("devices: not with device, callbacks or a storage object")
    resolved = [resolve_device(d) for d in devices]
    if not resolved:
        raise ValueError("devices: expected at least one device")
    gpus = [d for d in resolved if d.type == "cuda"]
    if len(set(gpus)) != len(gpus):  # two timers on one GPU would disturb each other
        raise ValueError(f"devices: each GPU at most once, got {[str(d) for d in resolved]}")
    names = {device_metadata(d)["device_name"] for d in resolved}
    if len(names) > 1:
        raise ValueError(
            f"devices: expected devices of one kind (they fill one table), got {sorted(names)}"
        )
    return resolved


def _run_processes(
    devices, runner, keys, storage_url, grace_s, progress_bar, compile_workers, compile_overlap
) -> None:
    """One spawned worker process per device on the shared storage; the progress bar follows
    the storage. A worker that dies is reported; the others take over its studies."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
    level = logging.getLogger("autotune").getEffectiveLevel()
    workers = []
    for index, device in enumerate(devices):
        args = (
            index,
            len(devices),
            str(device),
            keys,
            storage_url,
            runner.trials,
            runner.seed,
            dict(runner.time_kwargs),
            grace_s,
            level,
            compile_workers,
            compile_overlap,
        )
        process = context.Process(target=_worker_main, args=args, name=f"autotune-{index}")
        process.start()
        workers.append(process)
    reported = set()
    remaining = progress_bar.total
    try:
        while any(w.is_alive() for w in workers):
            time.sleep(1.0)
            left = sum(runner.remaining(k) for k in keys)
            progress_bar.advance(remaining - left)
            remaining = left
            for index, w in enumerate(workers):
                if w.exitcode not in (None, 0) and index not in reported:
                    reported.add(index)
                    logger.warning(
                        "worker %d (%s) died with exit code %s; the others take over its studies",
                        index,
                        devices[index],
                        w.exitcode,
                    )
    except KeyboardInterrupt:
        for w in workers:  # they got the same SIGINT: let them fail their trial and release
            w.join(timeout=30)
            if w.is_alive():
                w.terminate()
        raise
    progress_bar.advance(remaining - sum(runner.remaining(k) for k in keys))


def _worker_main(
    index, count, device, keys, storage_url, trials, seed, time_kwargs, grace_s, level,
    compile_workers, compile_overlap,
) -> None:  # fmt: skip
    """A worker process: the studies of ``keys`` on ``device``, claiming each first."""
    import sys

    logging.basicConfig(level=level, format=f"%(levelname)s worker {index} %(name)s: %(message)s")
    optuna.logging.set_verbosity(logging.INFO if level <= logging.DEBUG else logging.ERROR)
    device = resolve_device(device)
    metadata = device_metadata(device)
    storage = open_storage(storage_url)
    runner = StudyRunner(
        storage, device, metadata["device_name"], metadata, trials, seed, time_kwargs=time_kwargs
    )
    try:
        with _ahead_of_time_compiling(runner, compile_workers, compile_overlap):
            run_worker(
                runner,
                keys,
                index=index,
                count=count,
                worker=f"worker{index}@{device}",
                grace_s=grace_s,
            )
    except KeyboardInterrupt:
        sys.exit(130)


def _study_keys(
    runner: StudyRunner,
    specs: Sequence[RopeSpec],
    buckets: Sequence[int],
    modes: Sequence[str],
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
        for mode in modes:
            for tokens in buckets:
                keys.append(StudyKey(runner.device_name, mode, spec, tokens, space.providers))
    if not keys:
        raise ValueError(f"providers: none of {list(providers)} can run any asked spec here")
    return keys


class _Progress:
    """A tqdm bar over counted trials, with the study being tuned as its description."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None
        self.total = 0

    def start(self, total: int) -> None:
        from tqdm.auto import tqdm

        self.total = total
        self.bar = tqdm(total=total, unit="trial", disable=not self.enabled, dynamic_ncols=True)

    def advance(self, count: int) -> None:
        if self.bar is not None and count > 0:
            self.bar.update(count)

    def __enter__(self) -> _Progress:
        from tqdm.contrib.logging import logging_redirect_tqdm

        self._redirect = logging_redirect_tqdm()
        self._redirect.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._redirect.__exit__(*exc)
        if self.bar is not None:
            self.bar.close()

    def describe(self, key: StudyKey) -> None:
        if self.bar is not None:
            self.bar.set_description_str(f"{key.mode} {key.spec.key} T={key.tokens}", refresh=False)

    def on_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self.bar is not None and trial.user_attrs.get("outcome") in COUNTED_OUTCOMES:
            self.bar.update(1)


# -- reporting -----------------------------------------------------------------------------------


def format_summary(table: Mapping[str, Any]) -> str:
    """Per mode and spec: each bucket's winner, its median, and its speedup over the best time
    of every provider measured (``1.00x`` for the winner itself)."""
    lines = []
    for mode, specs in sorted(table["entries"].items()):
        for spec_key, buckets in sorted(specs.items()):
            names = sorted({p for e in buckets.values() for p in e.get("providers_us", {})})
            lines.append(f"{mode}  {spec_key}")
            header = f"  {'tokens':>7}  {'winner':<14}{'median_us':>10}   speedup over: "
            lines.append(header + "  ".join(f"{n:>13}" for n in names))
            for bucket in sorted(buckets, key=int):
                entry = buckets[bucket]
                cells = []
                for name in names:
                    other = entry.get("providers_us", {}).get(name)
                    cells.append(f"{other / entry['median_us']:>12.2f}x" if other else f"{'-':>13}")
                lines.append(
                    f"  {bucket:>7}  {entry['provider']:<14}{entry['median_us']:>10.2f}   "
                    f"{'':14}" + "  ".join(cells)
                )
    return "\n".join(lines) if lines else "no finished study"


_CSV_FIELDS = (
    "study",
    "device_name",
    "mode",
    "spec",
    "tokens",
    "trial",
    "state",
    "outcome",
    "provider",
    "config",
    "median_us",
    "p20_us",
    "p80_us",
    "error",
    "started",
    "finished",
)


def write_measurements_csv(
    storage: optuna.storages.BaseStorage, study_names: Iterable[str], path: str | os.PathLike
) -> Path:
    """Every finished trial of ``study_names`` as one CSV row (``config`` as JSON)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=_CSV_FIELDS)
        writer.writeheader()
        for name in study_names:
            try:
                study_id = storage.get_study_id_from_name(name)
            except KeyError:
                continue
            attrs = storage.get_study_user_attrs(study_id)
            for trial in storage.get_all_trials(study_id, deepcopy=False):
                if trial.state in (TrialState.WAITING, TrialState.RUNNING):
                    continue
                user = trial.user_attrs
                writer.writerow(
                    {
                        "study": name,
                        "device_name": attrs.get("device_name"),
                        "mode": attrs.get("mode"),
                        "spec": attrs.get("spec"),
                        "tokens": attrs.get("tokens"),
                        "trial": trial.number,
                        "state": trial.state.name,
                        "outcome": user.get("outcome", ""),
                        "provider": user.get("provider", ""),
                        "config": orjson.dumps(user.get("config") or {}).decode(),
                        "median_us": user.get("median_us", ""),
                        "p20_us": user.get("p20_us", ""),
                        "p80_us": user.get("p80_us", ""),
                        "error": user.get("error", ""),
                        "started": trial.datetime_start or "",
                        "finished": trial.datetime_complete or "",
                    }
                )
    return path
