"""Bad input: every fault in the contract's list raises TypeError or ValueError naming the
argument, from check_rope_args and from every CPU provider's apply; the checks do no device work.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kernels import RopeSpec, get_provider
from kernels._checks import check_rope_args, qk_layout

T, HQ, HK, D, R = 5, 8, 2, 64, 32


def _good(device="cpu", dtype=torch.bfloat16):
    """A valid call: ``(positions, query, key, cos_sin_cache)``."""
    return (
        torch.arange(T, device=device),
        torch.randn(T, HQ * D, device=device).to(dtype),
        torch.randn(T, HK * D, device=device).to(dtype),
        torch.randn(64, R, device=device),
    )


def _with(**changes):
    args = dict(zip(("positions", "query", "key", "cos_sin_cache"), _good(), strict=True))
    args.update(changes)
    return args


# (fault, arguments, exception type, the argument the message must name first)
BAD_INPUTS = [
    ("qk_dtypes_differ", _with(key=torch.randn(T, HK * D)), TypeError, "key"),
    ("query_dtype_int", _with(query=torch.ones(T, HQ * D, dtype=torch.int32)), TypeError, "query"),
    (
        "query_dtype_float64",
        _with(query=torch.randn(T, HQ * D, dtype=torch.float64)),
        TypeError,
        "query",
    ),
    (
        "query_last_dim_strided",
        _with(query=torch.randn(T, 2 * HQ * D).to(torch.bfloat16)[:, ::2]),
        ValueError,
        "query",
    ),
    (
        "key_last_dim_strided",
        _with(key=torch.randn(T, HK, 2 * D).to(torch.bfloat16)[..., ::2]),
        ValueError,
        "key",
    ),
    (
        "cache_last_dim_strided",
        _with(cos_sin_cache=torch.randn(64, 2 * R)[:, ::2]),
        ValueError,
        "cos_sin_cache",
    ),
    ("rotary_dim_odd", _with(cos_sin_cache=torch.randn(64, R + 1)), ValueError, "cos_sin_cache"),
    (
        "rotary_dim_above_head_size",
        _with(cos_sin_cache=torch.randn(64, D + 2)),
        ValueError,
        "cos_sin_cache",
    ),
    (
        "query_width_not_multiple",
        _with(query=torch.randn(T, HQ * D + 8).to(torch.bfloat16)),
        ValueError,
        "query",
    ),
    (
        "key_width_not_multiple",
        _with(key=torch.randn(T, HK * D - 2).to(torch.bfloat16)),
        ValueError,
        "key",
    ),
    (
        "hq_not_multiple_of_hk",
        _with(key=torch.randn(T, 3 * D).to(torch.bfloat16)),
        ValueError,
        "key",
    ),
    (
        "positions_float",
        _with(positions=torch.arange(T, dtype=torch.float32)),
        TypeError,
        "positions",
    ),
    (
        "positions_int16",
        _with(positions=torch.arange(T, dtype=torch.int16)),
        TypeError,
        "positions",
    ),
    ("positions_bool", _with(positions=torch.ones(T, dtype=torch.bool)), TypeError, "positions"),
    ("positions_strided", _with(positions=torch.arange(2 * T)[::2]), ValueError, "positions"),
    ("positions_3d", _with(positions=torch.arange(T).reshape(T, 1, 1)), ValueError, "positions"),
    ("token_count_mismatch", _with(positions=torch.arange(T + 1)), ValueError, "query"),
    (
        "key_token_count_mismatch",
        _with(key=torch.randn(T - 1, HK * D).to(torch.bfloat16)),
        ValueError,
        "key",
    ),
    (
        "cache_dtype_other",
        _with(cos_sin_cache=torch.randn(64, R, dtype=torch.float16)),
        TypeError,
        "cos_sin_cache",
    ),
    ("cache_1d", _with(cos_sin_cache=torch.randn(64 * R)), ValueError, "cos_sin_cache"),
    (
        "positions_on_other_device",
        _with(positions=torch.arange(T, device="meta")),
        ValueError,
        "positions",
    ),
    (
        "key_on_other_device",
        _with(key=torch.empty(T, HK * D, device="meta", dtype=torch.bfloat16)),
        ValueError,
        "key",
    ),
    (
        "cache_on_other_device",
        _with(cos_sin_cache=torch.empty(64, R, device="meta")),
        ValueError,
        "cos_sin_cache",
    ),
    ("query_not_tensor", _with(query=[[0.0] * D] * T), TypeError, "query"),
    ("key_not_tensor", _with(key=1.0), TypeError, "key"),
    ("query_1d", _with(query=torch.randn(T * HQ * D).to(torch.bfloat16)), ValueError, "query"),
]


@pytest.mark.parametrize(
    ("fault", "args", "error", "names"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS]
)
def test_check_rope_args_rejects(fault, args, error, names):
    with pytest.raises(error) as info:
        check_rope_args(**args, head_size=D, is_neox=True)
    assert str(info.value).startswith(f"{names}:"), str(info.value)
    assert "expected" in str(info.value)


@pytest.mark.parametrize("name", ["torch", "torch_compile", "triton"])
@pytest.mark.parametrize(
    ("fault", "args", "error", "names"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS]
)
def test_apply_rejects_before_touching_anything(name, fault, args, error, names):
    query = args["query"]
    before = (
        query.clone() if isinstance(query, torch.Tensor) and query.device.type == "cpu" else None
    )
    with pytest.raises(error) as info:
        get_provider(name).apply(**args, head_size=D, is_neox=True)
    assert str(info.value).startswith(f"{names}:"), str(info.value)
    if before is not None:
        assert torch.equal(query, before)


@pytest.mark.parametrize("head_size", [0, -64, 64.0, True])
def test_head_size_must_be_a_positive_int(head_size):
    with pytest.raises(ValueError, match=r"^head_size:"):
        check_rope_args(*_good(), head_size=head_size, is_neox=True)


def test_rotary_dim_message_names_rotary_dim_and_head_size():
    with pytest.raises(ValueError) as info:
        check_rope_args(*_good()[:3], torch.randn(8, D + 2), head_size=D, is_neox=True)
    assert "rotary_dim" in str(info.value) and f"head_size={D}" in str(info.value)


# -- unsupported specs and unavailable providers -----------------------------------------------


def test_flashinfer_float32_spec_is_refused_by_name():
    flashinfer = get_provider("flashinfer")
    spec = RopeSpec(D, R, HQ, HK, True, torch.float32)
    assert "float32" in flashinfer.unsupported_reason(spec)
    with pytest.raises(ValueError, match=r"^spec: flashinfer does not support q8_kv2_d64_r32"):
        flashinfer.callable_for(spec)


def test_flashinfer_without_key_is_refused_by_apply():
    positions, query, _, cache = _good()
    with pytest.raises(ValueError, match=r"^key: flashinfer"):
        get_provider("flashinfer").apply(positions, query, None, cache, head_size=D, is_neox=True)


@pytest.mark.parametrize("name", ["flashinfer", "vllm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_apply_on_a_device_the_provider_cannot_use(name, dtype):
    """A clear ValueError naming the provider and device, not an error from deep inside."""
    query = _good(dtype=dtype)[1]
    before = query.clone()
    with pytest.raises(ValueError, match=rf"^query: {name} cannot run on cpu: .*CUDA"):
        get_provider(name).apply(*_good(dtype=dtype), head_size=D, is_neox=True)
    assert torch.equal(query, before)


def test_triton_on_meta_is_unavailable_not_launched():
    with pytest.raises(ValueError, match=r"^query: triton cannot run on meta"):
        get_provider("triton").apply(*_good(device="meta"), head_size=D, is_neox=True)


# -- triton config validation -------------------------------------------------------------------

SPEC = RopeSpec(
    head_size=128, rotary_dim=128, num_heads=8, num_kv_heads=2, is_neox=True, dtype=torch.bfloat16
)
BAD_CONFIGS = [
    ("unknown_parameter", {"block_size": 4}, "block_size"),
    ("value_outside_space", {"block_t": 3}, "block_t"),
    ("num_warps_outside_space", {"num_warps": 16}, "num_warps"),
    ("tile_too_large", {"block_t": 64, "block_h": 8, "num_warps": 1}, "tile"),
    ("head_split_over_head_blocks", {"block_h": 8, "head_split": 4}, "head_split"),
    ("block_h_over_heads", {"block_h": 16, "block_t": 1}, "block_h"),
]


@pytest.mark.parametrize(("fault", "config", "names"), BAD_CONFIGS, ids=[b[0] for b in BAD_CONFIGS])
def test_triton_config_validation(fault, config, names):
    triton = get_provider("triton")
    with pytest.raises(ValueError) as info:
        triton.callable_for(SPEC, config)
    assert str(info.value).startswith("config:") and names in str(info.value)
    positions = torch.arange(T)
    query = torch.randn(T, 8 * 128).to(torch.bfloat16)
    key = torch.randn(T, 2 * 128).to(torch.bfloat16)
    before = query.clone()
    with pytest.raises(ValueError, match=r"^config:"):
        triton.apply(
            positions, query, key, torch.randn(64, 128), head_size=128, is_neox=True, config=config
        )
    assert torch.equal(query, before)


def test_triton_partial_config_is_completed_with_defaults():
    full = get_provider("triton").check_config(SPEC, {"num_warps": 8})
    assert full["num_warps"] == 8
    assert {k: v for k, v in full.items() if k != "num_warps"} == {
        k: v for k, v in get_provider("triton").default_config(SPEC).items() if k != "num_warps"
    }


@pytest.mark.parametrize("name", ["torch", "flashinfer", "vllm"])
def test_untunable_providers_refuse_any_config(name):
    with pytest.raises(ValueError, match=rf"^config: {name} has no parameter"):
        get_provider(name).check_config(SPEC, {"block_t": 4})


# -- no device work ------------------------------------------------------------------------------


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("with_key", [True, False])
def test_checks_dispatch_no_tensor_op(with_key):
    """No kernel, no copy, no sync: only metadata is read (any aten op would be recorded)."""
    positions, _, _, cache = _good()
    qkv = torch.randn(2, 3, (HQ + 2 * HK) * D).to(torch.bfloat16)
    query, key = qkv[..., : HQ * D], qkv[..., HQ * D : (HQ + HK) * D]
    positions = positions[:3].repeat(2).reshape(2, 3)  # made before recording starts
    with _RecordOps() as recorder:
        spec, q_layout, k_layout = check_rope_args(
            positions, query, key if with_key else None, cache, head_size=D, is_neox=False
        )
    assert recorder.ops == []
    assert spec == RopeSpec(D, R, HQ, HK if with_key else HQ, False, torch.bfloat16)
    width = (HQ + 2 * HK) * D
    assert q_layout == (6, HQ, width, D)
    assert k_layout == ((6, HK, width, D) if with_key else None)


def test_checks_work_on_meta_tensors():
    """Meta tensors have no data: the checks read only shapes, strides, dtypes and devices."""
    positions = torch.empty(2, 7, dtype=torch.int32, device="meta")
    padded = torch.empty(2, 7, HQ, D + 16, dtype=torch.float16, device="meta")
    key = torch.empty(2, 7, HK, D, dtype=torch.float16, device="meta")
    cache = torch.empty(4096, D, dtype=torch.float16, device="meta")
    spec, q_layout, k_layout = check_rope_args(
        positions, padded[..., :D], key, cache, head_size=D, is_neox=True
    )
    assert spec.key == f"q{HQ}_kv{HK}_d{D}_r{D}_neox_float16"
    assert q_layout == (14, HQ, HQ * (D + 16), D + 16)
    assert k_layout == (14, HK, HK * D, D)
    # Faults are found on meta tensors too.
    with pytest.raises(ValueError, match=r"^key:"):
        check_rope_args(
            positions, padded[..., :D], key[:, :, :1].expand(2, 7, 3, D), cache, D, True
        )


@pytest.mark.parametrize(
    ("shape", "view", "want"),
    [
        ((T, 3 * D), lambda x: x[:, D:], (T, 2, 3 * D, D)),  # column slice of a fused tensor
        ((T, 4, D + 8), lambda x: x[..., :D], (T, 4, 4 * (D + 8), D + 8)),  # head-padded
        ((T, 4, D), lambda x: x, (T, 4, 4 * D, D)),
        ((1, T, 4 * D), lambda x: x, (T, 4, 4 * D, D)),  # [B, S, H*D] with B == 1
        ((3, T, 2, D), lambda x: x, (3 * T, 2, 2 * D, D)),
    ],
)
def test_qk_layout_reads_strided_views(shape, view, want):
    x = view(torch.empty(shape, device="meta"))
    assert qk_layout("query", x, D, want[0]) == want


def test_qk_layout_refuses_batch_that_does_not_flatten():
    x = torch.empty(3, 2 * T, 4 * D, device="meta")[:, :T]  # batch stride != S * token stride
    with pytest.raises(ValueError, match=r"^query: .*flatten"):
        qk_layout("query", x, D, 3 * T)
