"""One tuning worker process per device, all on one study storage (see
:mod:`autotune.distributed` for how they share the studies)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
import torch

from kernels.perf_model import find_model
from kernels.table import device_metadata

from ._device import resolve_device
from .distributed import run_worker
from .objective import Objective
from .progress import Progress
from .runner import StudyRunner
from .storage import open_storage
from .studies import StudyKey
from .warm_start import model_candidates

__all__ = ["WorkerJob", "check_devices", "run_processes"]

logger = logging.getLogger(__name__)


def check_devices(devices: Sequence[torch.device | str]) -> list[torch.device]:
    """The worker devices, after checking they fit together.

    Raises:
        ValueError: no device, two workers on one GPU, or devices of different names (they
            would need different tables).
    """
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


@dataclass(frozen=True)
class WorkerJob:
    """What one worker process runs: the studies of ``keys`` on ``device``, claiming each."""

    index: int
    count: int
    device: str
    keys: Sequence[StudyKey]
    storage_url: str
    trials: int
    seed: int | None
    time_kwargs: Mapping[str, Any] = field(default_factory=dict)
    grace_s: float = 120.0
    log_level: int = logging.WARNING
    warm_start: bool = True

    def __call__(self) -> None:
        logging.basicConfig(
            level=self.log_level, format=f"%(levelname)s worker {self.index} %(name)s: %(message)s"
        )
        debug = self.log_level <= logging.DEBUG
        optuna.logging.set_verbosity(logging.INFO if debug else logging.ERROR)
        device = resolve_device(self.device)
        model = find_model(None, device, transfer=True) if self.warm_start else None
        runner = StudyRunner(
            open_storage(self.storage_url),
            Objective(device, self.seed, self.time_kwargs),
            device_metadata(device),
            self.trials,
            self.seed,
            first_candidates=None if model is None else model_candidates(model),
        )
        try:
            run_worker(
                runner,
                self.keys,
                index=self.index,
                count=self.count,
                worker=f"worker{self.index}@{device}",
                grace_s=self.grace_s,
            )
        except KeyboardInterrupt:
            sys.exit(130)


def run_processes(jobs: Sequence[WorkerJob], runner: StudyRunner, progress: Progress) -> None:
    """Start one spawned process per job and wait for them; the progress bar follows the
    storage through ``runner``. A worker that dies is reported; the others take over its
    studies."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
    workers = []
    for job in jobs:
        process = context.Process(target=job, name=f"autotune-{job.index}")
        process.start()
        workers.append(process)
    keys = jobs[0].keys
    reported = set()
    remaining = progress.total
    try:
        while any(w.is_alive() for w in workers):
            time.sleep(1.0)
            left = sum(runner.remaining(k) for k in keys)
            progress.advance(remaining - left)
            remaining = left
            for job, w in zip(jobs, workers, strict=True):
                if w.exitcode not in (None, 0) and job.index not in reported:
                    reported.add(job.index)
                    logger.warning(
                        "worker %d (%s) died with exit code %s; the others take over its studies",
                        job.index,
                        job.device,
                        w.exitcode,
                    )
    except KeyboardInterrupt:
        for w in workers:  # they got the same SIGINT: let them fail their trial and release
            w.join(timeout=30)
            if w.is_alive():
                w.terminate()
        raise
    progress.advance(remaining - sum(runner.remaining(k) for k in keys))
