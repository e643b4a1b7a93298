"""Compile many Triton configs in parallel before a sweep times them one by one.

Compiling dominates a sweep of the Triton space (about half a second per config, one at a
time). Worker processes launch each config once on inputs of the same layout as the timed
ones; Triton's on-disk cache then serves the sweep's own launches in milliseconds. The
specialization (dtypes, pointer alignment, stride divisibility) depends on the layout, not on
the token count, so the workers' small inputs produce the cache entries the sweep looks up.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Sequence
from typing import Any

import torch

from autotune.measure import make_inputs
from kernels import RopeSpec, get_provider

logger = logging.getLogger(__name__)

_TOKENS = 64  # the layout matters, not the size


def _compile_some(job: tuple[str, str, list[dict[str, Any]]]) -> int:
    spec_key, device, configs = job
    spec = RopeSpec.from_key(spec_key)
    inputs = make_inputs(spec, _TOKENS, device)
    compiled = 0
    for config in configs:
        try:
            get_provider("triton").bound(spec, config)(*inputs.args)
            compiled += 1
        except Exception as exc:  # a config that fails here fails (and is reported) in the sweep
            logger.debug("precompile %s: %s", config, exc)
    torch.cuda.synchronize(device)
    return compiled


def precompile_triton(
    spec: RopeSpec, configs: Sequence[dict[str, Any]], device: torch.device, workers: int = 0
) -> int:
    """Compile ``configs`` of the Triton provider for ``spec`` into Triton's disk cache.

    Args:
        workers: Processes to use; 0 for one per CPU core less one. Does nothing off CUDA.

    Returns:
        How many configs compiled.
    """
    if device.type != "cuda" or not configs:
        return 0
    workers = workers or max(1, (os.cpu_count() or 2) - 1)
    jobs = [(spec.key, str(device), list(configs[i::workers])) for i in range(workers)]
    with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
        return sum(pool.map(_compile_some, jobs))
