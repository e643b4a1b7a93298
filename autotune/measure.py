"""The tuner's measurement is the runtime's: :mod:`kernels.measure` (re-exported here for
scripts written against this module's former home)."""

from kernels.measure import (
    GATE_TOKENS,
    MAX_POSITION,
    RopeInputs,
    Timing,
    check_correct,
    copy_bandwidth,
    make_inputs,
    time_rope,
)

__all__ = [
    "GATE_TOKENS",
    "MAX_POSITION",
    "RopeInputs",
    "Timing",
    "check_correct",
    "copy_bandwidth",
    "make_inputs",
    "time_rope",
]
