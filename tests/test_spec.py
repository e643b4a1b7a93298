"""RopeSpec: the key format round-trips, bad values are refused by name, dtype aliases parse."""

from __future__ import annotations

import itertools

import pytest
import torch

from kernels import DTYPE_NAMES, RopeSpec, parse_dtype

SPECS = [
    RopeSpec(head_size=d, rotary_dim=r, num_heads=hq, num_kv_heads=hk, is_neox=neox, dtype=dtype)
    for (d, r), (hq, hk), neox, dtype in itertools.product(
        [(64, 64), (80, 32), (96, 24), (128, 128), (256, 64)],
        [(32, 8), (12, 4), (1, 1), (64, 64)],
        [True, False],
        [torch.float16, torch.bfloat16, torch.float32],
    )
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.key)
def test_key_round_trip(spec):
    assert RopeSpec.from_key(spec.key) == spec
    assert RopeSpec.from_key(spec.key).key == spec.key


def test_key_format():
    spec = RopeSpec(128, 64, 32, 8, False, torch.bfloat16)
    assert spec.key == "q32_kv8_d128_r64_gptj_bfloat16"
    assert RopeSpec(64, 64, 4, 4, True, torch.float16).key == "q4_kv4_d64_r64_neox_float16"
    assert len({s.key for s in SPECS}) == len(SPECS)


@pytest.mark.parametrize(
    "key",
    [
        "",
        "q32_kv8_d128_r64_gptj_bf16",  # keys use canonical dtype names only
        "q32_kv8_d128_r64_rope_bfloat16",
        "q32_kv8_d128_gptj_bfloat16",
        "Q32_kv8_d128_r64_gptj_bfloat16",
        "q32_kv8_d128_r64_gptj_bfloat16_extra",
        " q32_kv8_d128_r64_gptj_bfloat16",
        "q-32_kv8_d128_r64_gptj_bfloat16",
    ],
)
def test_from_key_refuses_other_forms(key):
    with pytest.raises(ValueError, match=r"^spec key:"):
        RopeSpec.from_key(key)


@pytest.mark.parametrize(
    "key",
    [
        "q32_kv8_d128_r129_neox_float16",  # rotary_dim odd
        "q32_kv8_d128_r256_neox_float16",  # rotary_dim above head_size
        "q32_kv6_d128_r128_neox_float16",  # Hk does not divide Hq
        "q0_kv8_d128_r128_neox_float16",
    ],
)
def test_from_key_refuses_bad_values(key):
    with pytest.raises(ValueError):
        RopeSpec.from_key(key)


@pytest.mark.parametrize(
    ("changes", "name"),
    [
        ({"head_size": 0}, "head_size"),
        ({"head_size": -128}, "head_size"),
        ({"head_size": 128.0}, "head_size"),
        ({"head_size": True}, "head_size"),
        ({"rotary_dim": 0}, "rotary_dim"),
        ({"rotary_dim": 63}, "rotary_dim"),
        ({"rotary_dim": 130}, "rotary_dim"),
        ({"num_heads": 0}, "num_heads"),
        ({"num_heads": "32"}, "num_heads"),
        ({"num_kv_heads": 0}, "num_kv_heads"),
        ({"num_kv_heads": 3}, "num_kv_heads"),
        ({"num_kv_heads": 64}, "num_kv_heads"),
        ({"dtype": torch.float64}, "dtype"),
        ({"dtype": torch.int8}, "dtype"),
        ({"dtype": "fp8"}, "dtype"),
    ],
)
def test_bad_values_are_refused_by_name(changes, name):
    fields = {
        "head_size": 128,
        "rotary_dim": 128,
        "num_heads": 32,
        "num_kv_heads": 8,
        "is_neox": True,
        "dtype": torch.bfloat16,
    }
    with pytest.raises(ValueError, match=f"^{name}:"):
        RopeSpec(**{**fields, **changes})


@pytest.mark.parametrize(
    ("text", "dtype"),
    [
        ("bf16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("torch.bfloat16", torch.bfloat16),
        ("BF16", torch.bfloat16),
        (" fp16 ", torch.float16),
        ("half", torch.float16),
        ("float16", torch.float16),
        ("fp32", torch.float32),
        ("float", torch.float32),
        ("float32", torch.float32),
        (torch.float16, torch.float16),
    ],
)
def test_parse_dtype_aliases(text, dtype):
    assert parse_dtype(text) is dtype


@pytest.mark.parametrize("value", ["fp8", "float64", "int32", "", torch.float64, torch.int64])
def test_parse_dtype_refuses(value):
    with pytest.raises(ValueError, match=r"^dtype:"):
        parse_dtype(value)


def test_every_dtype_name_parses_to_its_dtype():
    for name, dtype in DTYPE_NAMES.items():
        assert parse_dtype(name) is dtype


def test_spec_normalizes_dtype_alias_and_style():
    spec = RopeSpec(128, 128, 32, 8, 1, "bf16")
    assert spec.dtype is torch.bfloat16 and spec.is_neox is True
    assert spec == RopeSpec(128, 128, 32, 8, True, torch.bfloat16)
    assert hash(spec) == hash(RopeSpec(128, 128, 32, 8, True, torch.bfloat16))


def test_specs_sort_by_key():
    assert [s.key for s in sorted(SPECS)] == sorted(s.key for s in SPECS)


def test_bytes_moved():
    spec = RopeSpec(128, 64, 32, 8, True, torch.bfloat16)
    # Per token: rotated q and k heads read and written (2 * 40 * 64 * 2 bytes), a float32
    # cos/sin row (64 * 4) and an int64 position (8).
    assert spec.bytes_moved(10) == 10 * (2 * 40 * 64 * 2 + 64 * 4 + 8)
    assert spec.bytes_moved(
        3, cache_dtype=torch.bfloat16, positions_dtype=torch.int32, with_key=False
    ) == 3 * (2 * 32 * 64 * 2 + 64 * 2 + 4)
