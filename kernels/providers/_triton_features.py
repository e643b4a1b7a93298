"""The Triton provider's performance-model features: the call's (:mod:`kernels.perf_features`),
then what its config does with the call on the device, read off :class:`TritonGeometry`
(programs, waves over the resident slots, serial head-block steps, bytes per step, elements
per thread, lane use, cos/sin reuse, warps, stages). A changed definition bumps
:data:`kernels.perf_features.FEATURES_VERSION`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .._spec import RopeSpec
from ..perf_features import CALL_FEATURES, call_features, resident_programs
from ._triton_geometry import TritonGeometry

__all__ = ["TRITON_FEATURES", "triton_features"]

TRITON_FEATURES = (
    *CALL_FEATURES,
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


def triton_features(
    spec: RopeSpec, num_tokens: int, config: Mapping[str, Any], *, sm_count: int
) -> list[float]:
    """Features of one call (order of :data:`TRITON_FEATURES`) with a complete ``config``
    (``block_t``, ``block_h``, ``head_split``, ``num_warps``, ``num_stages``)."""
    base = call_features(spec, num_tokens)
    geometry = TritonGeometry.of(spec, config)
    warps, stages = config["num_warps"], config["num_stages"]
    programs = geometry.programs(num_tokens)
    waves = max(1.0, programs / resident_programs(sm_count, warps))
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
