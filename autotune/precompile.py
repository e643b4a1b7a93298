"""Compile Triton configs in worker processes before the trials (or sweeps) that time them.

Worker processes launch each config once on small inputs of the same layout as the timed ones
(or, with ``launch=False``, only compile it for host tensors of that layout); Triton's on-disk
cache then serves the timing process's own launch. The specialization (dtypes, pointer
alignment, stride divisibility) depends on the layout, not on the token count or the device,
so the workers' inputs produce the cache entries the timed launch looks up. Called, the pool
works while the timing process waits, so it never disturbs a measurement;
:meth:`TritonPrecompiler.submit` lets the tuner time one batch while the next compiles
(``--compile-overlap``), with the workers at a lower priority. On the H200, timings taken while
launching workers compile read 2.5-7% faster; while compile-only workers compile, within 0.4%
(``benchmarks/overlap_check.py``): overlapping workers only compile.

Each job carries the timing process's Triton cache directory *at that moment*: torch.compile's
Inductor points ``TRITON_CACHE_DIR`` at a directory of its own the first time it compiles, so
after the first ``torch_compile`` trial, workers that kept the directory they started with
compiled into a cache the tuner no longer read.

Measured on the H200 (``benchmarks/first_call.py``, 16 Llama-3-8B configs): a first call that
compiles takes 183-228 ms (median), one served by launching workers' cache entries 1.4-2.1 ms,
by compile-only workers' 1.7 ms (the first of them also builds Triton's launcher stub, which
only a launch builds). The pool compiles 11-12 configs/s with 15 workers either way
(``benchmarks/pool_throughput.py``).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import CancelledError, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import torch

from kernels import RopeSpec, get_provider

from .measure import make_inputs

__all__ = ["Compiling", "TritonPrecompiler", "precompile_triton", "triton_cache_dir"]

logger = logging.getLogger(__name__)

_TOKENS = 64  # the layout matters, not the size
_PARENT_POLL_S = 1.0
_NICE = 10


def _init_worker() -> None:
    # Ctrl-C (or ``timeout -s INT``) reaches the whole process group: the tuner stops after the
    # trial in flight and then closes the pool, and the workers must not die under it. SIGTERM
    # stays fatal: the executor terminates the workers of a broken pool with it (a pool that
    # loses its workers to a group SIGTERM is reported, and the tuner is stopping anyway).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.nice(_NICE)  # the tuner may be measuring while they compile (``overlap``)
    # A tuner killed outright (SIGKILL, out of memory) cannot close the pool, and an idle worker
    # would wait on its call queue forever: leave when the parent is gone.
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(_PARENT_POLL_S)
    os._exit(1)


def triton_cache_dir() -> str:
    """The directory this process's Triton compiles into and loads from, now."""
    from triton import knobs

    return knobs.cache.dir


def _compile_some(job: tuple[str, str, list[dict[str, Any]], str, bool]) -> int:
    spec_key, device, configs, cache_dir, launch = job
    os.environ["TRITON_CACHE_DIR"] = cache_dir  # Triton reads it at every compile
    spec = RopeSpec.from_key(spec_key)
    # Compiling only needs the arguments' dtypes and layout: host tensors, no GPU work.
    inputs = make_inputs(spec, _TOKENS, device if launch else "cpu")
    compiled = 0
    for config in configs:
        try:
            launcher = get_provider("triton").bound(spec, config)
            if launch:
                launcher(*inputs.args)
            else:
                launcher.compile(*inputs.args)
            compiled += 1
        except Exception as exc:  # a config that fails here fails (and is reported) when timed
            logger.debug("precompile %s: %s", config, exc)
    if launch and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return compiled


class Compiling:
    """Configs handed to the workers; :meth:`wait` returns when they are in the disk cache."""

    def __init__(self, owner: TritonPrecompiler, pool: Any, futures: list, keys: set) -> None:
        self._owner, self._pool, self._futures, self._keys = owner, pool, futures, keys

    def wait(self) -> int:
        """Wait for the compiles; how many compiled (0 when the pool broke: the configs then
        compile in their trials)."""
        try:
            return sum(future.result() for future in self._futures)
        except (BrokenProcessPool, CancelledError) as exc:
            self._owner._lost(self._pool, self._keys, exc)
            return 0


class TritonPrecompiler:
    """A pool of worker processes compiling Triton configs for one CUDA device.

    Calling it compiles the configs not compiled before (by this object) and returns when they
    are in Triton's disk cache; :meth:`submit` starts the same and returns at once. Off CUDA it
    does nothing. The processes start on first use and stop on :meth:`close` (or leaving a
    ``with`` block); they run at a lower priority than the tuner (``nice`` 10), which matters
    when they compile while it measures. A pool that loses a worker is reported and replaced on
    the next call; the configs then compile in their trials as without a pool.

    Args:
        device: The device whose kernels are compiled (the workers compile for its target).
        workers: Worker processes; 0 for one per CPU core less one.
        launch: Whether the workers launch each config once on the device (how its first call
            compiles it, so the cache holds what that call looks up), or only compile it
            (``_Launcher.compile``: host tensors, no GPU work; ``benchmarks/first_call.py``
            checks the timing process still finds the kernels).
    """

    def __init__(self, device: torch.device | str, workers: int = 0, launch: bool = True) -> None:
        self.device = torch.device(device)
        self.workers = workers or max(1, (os.cpu_count() or 2) - 1)
        self.launch = launch
        self._pool: Any = None
        self._done: set[tuple[RopeSpec, tuple]] = set()

    def __call__(self, spec: RopeSpec, configs: Iterable[Mapping[str, Any]]) -> int:
        """Compile ``configs`` of the Triton provider for ``spec``; how many compiled now."""
        return self.submit(spec, configs).wait()

    def submit(self, spec: RopeSpec, configs: Iterable[Mapping[str, Any]]) -> Compiling:
        """Start compiling ``configs`` (those not compiled or started before) and return."""
        configs = list(configs)
        for config in configs:  # checked everywhere, so a wrong call fails off CUDA too
            if not isinstance(config, Mapping):
                raise TypeError(f"configs: expected mappings of parameters, got {config!r}")
        if not self._compiles_here:
            return Compiling(self, None, [], set())
        fresh, keys = [], set()
        for config in configs:
            key = (spec, tuple(sorted(config.items())))
            if key not in self._done and key not in keys:
                keys.add(key)
                fresh.append(dict(config))
        if not fresh:
            return Compiling(self, None, [], set())
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),  # CUDA cannot be forked
                initializer=_init_worker,
            )
        cache_dir = triton_cache_dir()
        workers = min(self.workers, len(fresh))
        jobs = [
            (spec.key, str(self.device), fresh[i::workers], cache_dir, self.launch)
            for i in range(workers)
        ]
        # Started counts as done, so a batch asked while this one compiles does not repeat it.
        self._done |= keys
        try:
            futures = [self._pool.submit(_compile_some, job) for job in jobs]
        except BrokenProcessPool as exc:
            self._lost(self._pool, keys, exc)
            return Compiling(self, None, [], set())
        return Compiling(self, self._pool, futures, keys)

    def _lost(self, pool: Any, keys: set, exc: BaseException) -> None:
        """``pool`` lost a worker before ``keys`` compiled: they compile in their trials, and
        the next call starts a new pool."""
        logger.warning("precompile: a worker died (%r); starting a new pool next time", exc)
        self._done -= keys
        if self._pool is pool:  # not one started since
            self.close()

    @property
    def _compiles_here(self) -> bool:
        return self.device.type == "cuda"

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> TritonPrecompiler:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def precompile_triton(
    spec: RopeSpec,
    configs: Iterable[Mapping[str, Any]],
    device: torch.device | str,
    workers: int = 0,
    launch: bool = True,
) -> int:
    """Compile ``configs`` for ``spec`` once, in a pool started and stopped for the purpose
    (``launch`` as for :class:`TritonPrecompiler`).

    Returns:
        How many configs compiled.
    """
    with TritonPrecompiler(device, workers, launch) as precompiler:
        return precompiler(spec, configs)
