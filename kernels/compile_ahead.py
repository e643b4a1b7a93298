"""Compiling the Triton kernels of many callables at once, on a pool of threads.

Triton releases the GIL for most of a compile (its MLIR passes, ``ptxas``), so compiles on
threads overlap. Inside ``triton.AsyncCompileMode`` a callable's ``compile_for`` (the Triton
provider's launcher has one) hands its compile to the mode's executor, and Triton's in-memory
kernel cache holds the result when the mode ends: the first real call on inputs of the same
layout finds its kernel ready. Worth it where the kernels to run are known before the first
runs and compiling dominates, as in ``python -m autotune verify`` on a cold cache and in
tuning on first use (:mod:`kernels.first_use`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import torch
import triton

from ._spec import RopeSpec
from .measure import make_inputs
from .providers import RopeFn

__all__ = ["compile_ahead", "default_compile_threads"]


def default_compile_threads() -> int:
    """One thread per CPU this process may use, at most 32."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, min(32, len(os.sched_getaffinity(0))))
    return max(1, min(32, os.cpu_count() or 1))


def compile_ahead(
    jobs: Iterable[tuple[RopeFn, RopeSpec, bool]],
    device: torch.device | str,
    num_tokens: int,
    *,
    threads: int | None = None,
) -> int:
    """Compile the kernels each ``(fn, spec, keyless)`` job's calls will run on ``spec``'s
    inputs of ``num_tokens`` tokens (:func:`kernels.measure.make_inputs`' layout), with a key
    and, where ``keyless``, without; on ``threads`` threads (default
    :func:`default_compile_threads`).

    Callables without ``compile_for`` are skipped, and so is everything where this Triton has no
    ``AsyncCompileMode``. A compile that fails is dropped here: the call that needs the kernel
    compiles it again and raises then. Returns the number of compiles started.
    """
    async_mode = getattr(triton, "AsyncCompileMode", None)
    todo = [(fn, spec, keyless) for fn, spec, keyless in jobs if hasattr(fn, "compile_for")]
    if async_mode is None or not todo:
        return 0
    started = 0
    with (
        ThreadPoolExecutor(threads or default_compile_threads()) as pool,
        async_mode(pool, ignore_errors=True),
    ):
        for fn, spec, keyless in todo:
            for with_key in (True, False) if keyless else (True,):
                inputs = make_inputs(spec, num_tokens, device, with_key=with_key)
                fn.compile_for(*inputs.args)
                started += 1
    return started
