"""The performance model's features (:mod:`kernels.perf_model`): what carries across shapes.

Every provider's features describe the call (memory traffic, tokens, heads, rotated bytes per row,
style, dtype); Triton's add what its config does with them on the device (programs, waves over
the SMs' resident slots, serial head-block steps, bytes per step, elements per thread, lane use,
cos/sin reuse, warps, stages). A changed definition bumps :data:`FEATURES_VERSION`, so that a
model fit on other definitions is refused rather than misread.

The Triton provider's parameter space and checks are imported in :func:`triton_space` alone
(their module may move).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

from ._spec import RopeSpec
from .providers._triton_geometry import TritonGeometry

__all__ = [
    "FEATURES_VERSION",
    "TRITON",
    "feature_names",
    "features",
    "triton_candidates",
    "triton_space",
]

FEATURES_VERSION = 2
TRITON = "triton"

# -- imports from modules that may move (the Triton provider's parameter space and checks) ----


def triton_space() -> tuple[Mapping[str, Sequence[Any]], Any, Any]:
    """``(PARAM_SPACE, config_problems, default_triton_config)`` of the Triton provider."""
    from .providers._triton import PARAM_SPACE, config_problems, default_triton_config

    return PARAM_SPACE, config_problems, default_triton_config


# -- features ----------------------------------------------------------------------------------

_MAX_WARPS_PER_SM = 64
_MAX_PROGRAMS_PER_SM = 32
# HBM serves a head row's rotated slice in whole 64-byte accesses: on the H200 a 32-byte slice
# (rotary 16 in fp16) takes as long per row as a 64-byte one (benchmarks/NOTES.md, unseen
# shapes), so traffic, not the bytes a call needs, is what carries to small rotary dims.
_DRAM_ACCESS_BYTES = 64

_SPEC_FEATURES = (
    "log_traffic",  # bytes HBM moves: rotated slices in whole accesses, cos/sin, positions
    "log_tokens",
    "log_heads",
    "log_q_per_kv",
    "log_row_bytes",  # rotated bytes per head row: how HBM serves the slice
    "partial",  # rotary_dim < head_size: rows are not contiguous across heads
    "gptj",
    "float16",
)
_TRITON_FEATURES = (
    *_SPEC_FEATURES,
    "log_programs",
    "log_waves",  # programs over the resident slots of all SMs, at least one wave
    "log_steps",  # head blocks the busiest program walks one after the other
    "log_step_bytes",  # q/k bytes one program moves per head-block step
    "log_elems_per_thread",
    "log_lane_use",  # rotated elements over the tile's elements (padding, head masks)
    "log_cos_sin_reuse",  # heads rotated per cos/sin row loaded
    "log_block_t",
    "step_latency",  # serial head-block steps per wave: round trips that do not overlap
    "traffic_x_steps",
    "warps_1",
    "warps_2",
    "warps_8",
    "stages_2",
    "stages_3",
    "waves_x_traffic",
)


def feature_names(provider: str) -> tuple[str, ...]:
    """The features (in order) of ``provider``'s model under :data:`FEATURES_VERSION`."""
    return _TRITON_FEATURES if provider == TRITON else _SPEC_FEATURES


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _traffic(spec: RopeSpec, tokens: int) -> int:
    """Bytes HBM moves for a call: each rotated slice read and written in whole accesses, one
    float32 cos/sin row and one int64 position per token."""
    row = _cdiv(spec.rotary_dim * spec.dtype.itemsize, _DRAM_ACCESS_BYTES) * _DRAM_ACCESS_BYTES
    return tokens * (2 * (spec.num_heads + spec.num_kv_heads) * row + 4 * spec.rotary_dim + 8)


def _spec_features(spec: RopeSpec, tokens: int) -> list[float]:
    elem = spec.dtype.itemsize
    return [
        math.log(_traffic(spec, tokens)),
        math.log(tokens),
        math.log(spec.num_heads + spec.num_kv_heads),
        math.log(spec.num_heads / spec.num_kv_heads),
        math.log(spec.rotary_dim * elem),
        float(spec.rotary_dim < spec.head_size),
        float(not spec.is_neox),
        float(spec.dtype_name == "float16"),
    ]


def features(
    provider: str,
    spec: RopeSpec,
    tokens: int,
    config: Mapping[str, Any] | None = None,
    *,
    sm_count: int,
) -> list[float]:
    """Feature vector of one call (order of :func:`feature_names`).

    Args:
        provider: Provider name; ``"triton"`` needs ``config`` (block_t, block_h, head_split,
            num_warps, num_stages), the others take none.
        tokens: Token count, at least 1.
        sm_count: The device's streaming multiprocessors (the model file's metadata; 1 when
            it has none, as for a CPU).
    """
    base = _spec_features(spec, tokens)
    if provider != TRITON:
        return base
    geometry = TritonGeometry.of(spec, config)
    warps, stages = config["num_warps"], config["num_stages"]
    programs = geometry.programs(tokens)
    slots = sm_count * min(_MAX_PROGRAMS_PER_SM, _MAX_WARPS_PER_SM // warps)
    waves = max(1.0, programs / slots)
    steps = geometry.steps
    log_traffic = base[0]
    log_step_bytes = math.log(2 * geometry.tile * spec.dtype.itemsize)
    return [
        *base,
        math.log(programs),
        math.log(waves),
        math.log(steps),
        log_step_bytes,
        math.log(geometry.elems_per_thread(warps)),
        math.log(geometry.lane_use),
        math.log(geometry.heads_per_program),
        math.log(geometry.block_t),
        steps / waves,
        log_traffic * math.log(steps),
        float(warps == 1),
        float(warps == 2),
        float(warps == 8),
        float(stages == 2),
        float(stages == 3),
        math.log(waves) * log_traffic,
    ]


# -- the Triton candidates ---------------------------------------------------------------------


def triton_candidates(spec: RopeSpec) -> list[dict[str, int]]:
    """Every Triton config of the parameter space that is valid for ``spec``
    (``config_problems`` empty), in the space's product order."""
    space, config_problems, _ = triton_space()
    names = sorted(space)
    out = []
    for values in itertools.product(*(space[n] for n in names)):
        config = dict(zip(names, values, strict=True))
        if not config_problems(spec, config):
            out.append(config)
    return out
