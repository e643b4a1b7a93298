"""``benchmarks/tune_time.py``: the tuner command names exactly the spec asked for."""

from __future__ import annotations

import pytest
from conftest import load_benchmark

from autotune.cli import build_parser, specs_from_args
from kernels import RopeSpec

tune_time = load_benchmark("tune_time")


@pytest.mark.parametrize(
    "key",
    [
        "q32_kv8_d128_r128_neox_bfloat16",
        "q16_kv16_d256_r64_gptj_float16",
        "q28_kv4_d128_r128_neox_bfloat16_mrope16-24-24",
        "q32_kv8_d128_r128_neox_bfloat16_mropei24-20-20",
    ],
)
def test_spec_flags_name_the_spec(key):
    spec = RopeSpec.from_key(key)
    args = build_parser().parse_args(tune_time.spec_flags(spec))
    assert specs_from_args(args, None) == [spec]
