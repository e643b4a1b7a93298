"""The performance model's features (:mod:`kernels.perf_model`): what carries across shapes.

Every provider's features start with the call's (:data:`CALL_FEATURES`: memory traffic, tokens,
heads, rotated bytes per row, style, dtype); a tunable provider adds what its config does with
them on the device (:meth:`kernels.providers.Provider.features`), for which
:func:`resident_programs` gives the device's side. A changed definition, here or in a
provider, bumps :data:`FEATURES_VERSION`, so that a model fit on other definitions is refused
rather than misread.
"""

from __future__ import annotations

import math

from ._spec import RopeSpec

__all__ = ["CALL_FEATURES", "FEATURES_VERSION", "call_features", "resident_programs"]

FEATURES_VERSION = 2

_MAX_WARPS_PER_SM = 64
_MAX_PROGRAMS_PER_SM = 32
# HBM serves a head row's rotated slice in whole 64-byte accesses: a 32-byte slice (rotary 16
# in fp16) takes as long per row as a 64-byte one (docs/DESIGN.md#sub-64-byte-rows), so
# traffic, not the bytes a call needs, is what carries to small rotary dims.
_DRAM_ACCESS_BYTES = 64

CALL_FEATURES = (
    "log_traffic",  # bytes HBM moves: rotated slices in whole accesses, cos/sin, positions
    "log_tokens",
    "log_heads",
    "log_q_per_kv",
    "log_row_bytes",  # rotated bytes per head row: how HBM serves the slice
    "partial",  # rotary_dim < head_size: rows are not contiguous across heads
    "gptj",
    "float16",
)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _traffic(spec: RopeSpec, tokens: int) -> int:
    """Bytes HBM moves for a call: each rotated slice read and written in whole accesses, one
    float32 cos/sin row and one int64 position per token."""
    row = _cdiv(spec.rotary_dim * spec.dtype.itemsize, _DRAM_ACCESS_BYTES) * _DRAM_ACCESS_BYTES
    return tokens * (2 * (spec.num_heads + spec.num_kv_heads) * row + 4 * spec.rotary_dim + 8)


def call_features(spec: RopeSpec, tokens: int) -> list[float]:
    """The call's features (order of :data:`CALL_FEATURES`) for ``tokens`` (at least 1)."""
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


def resident_programs(sm_count: int, num_warps: int) -> int:
    """Programs of ``num_warps`` warps the device holds at once: per streaming multiprocessor,
    as many as its warp slots allow, at most its program slots."""
    return sm_count * min(_MAX_PROGRAMS_PER_SM, _MAX_WARPS_PER_SM // num_warps)
