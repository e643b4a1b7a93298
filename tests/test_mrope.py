"""Multimodal RoPE (mRoPE): the layout and its key, the float64 reference, every provider that
runs here against it, the argument checks, and the selector with an mRoPE spec.

vLLM's own layers are in ``test_mrope_vllm.py``.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from conftest import FILE, entry, make_table, perf_model_data, put, put_model

from kernels import (
    RopeSpec,
    RopeTableWarning,
    cos_sin_cache,
    get_provider,
    mrope_stream_map,
    select_rope,
)
from kernels.providers import TRITON_MROPE
from kernels.providers._vllm_mrope import VllmMropeProvider, load_vllm_mrope
from kernels.table import TableError, read_table
from kernels.testing import TOLERANCES, assert_rope_close, rope_reference

MAX_POSITION = 64

# (head_size, rotary_dim, Hq, Hk, is_neox, dtype, section, interleaved): chunked and
# interleaved, NeoX and GPT-J, partial rotary, every element type.
CASES = [
    (32, 16, 4, 2, True, torch.float32, (4, 2, 2), False),
    (32, 16, 4, 2, False, torch.bfloat16, (4, 2, 2), True),
    (32, 24, 3, 1, True, torch.float16, (6, 3, 3), True),  # partial rotary, interleaved
    (48, 24, 2, 2, False, torch.float32, (2, 6, 4), False),  # partial rotary, chunked
]
SPECS = [
    RopeSpec(d, r, hq, hk, neox, dtype, mrope_section=sec, mrope_interleaved=inter)
    for d, r, hq, hk, neox, dtype, sec, inter in CASES
]


def spec_id(spec: RopeSpec) -> str:
    return spec.key


# -- the layout ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "interleaved", "streams"),
    [
        ((2, 1, 1), False, (0, 0, 1, 2)),
        ((1, 2, 1), False, (0, 1, 1, 2)),
        ((0, 2, 2), False, (1, 1, 2, 2)),
        ((4, 2, 2), True, (0, 1, 2, 0, 1, 2, 0, 0)),
        # Qwen3-VL: THW twenty times, then the time stream's last four.
        ((24, 20, 20), True, (0, 1, 2) * 20 + (0,) * 4),
        # Qwen3.5 (rotary 64 of 256): the interleaved part ends inside a triplet.
        ((11, 11, 10), True, (0, 1, 2) * 10 + (0, 1)),
    ],
)
def test_stream_map(section, interleaved, streams):
    assert mrope_stream_map(section, interleaved) == streams
    spec = RopeSpec(128, 2 * sum(section), 2, 1, True, torch.bfloat16, section, interleaved)
    assert spec.mrope_streams == streams
    assert tuple(spec.mrope_streams.count(s) for s in range(3)) == section


def test_plain_spec_has_no_layout():
    spec = RopeSpec(128, 128, 32, 8, True, torch.bfloat16)
    assert not spec.is_mrope and spec.mrope_streams is None
    assert spec.key == "q32_kv8_d128_r128_neox_bfloat16"


@pytest.mark.parametrize(
    ("section", "interleaved", "suffix"),
    [((16, 24, 24), False, "_mrope16-24-24"), ((24, 20, 20), True, "_mropei24-20-20")],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("is_neox", [True, False])
def test_key_round_trip(section, interleaved, suffix, dtype, is_neox):
    spec = RopeSpec(128, 128, 28, 4, is_neox, dtype, section, interleaved)
    assert spec.key.endswith(suffix)
    assert RopeSpec.from_key(spec.key) == spec
    assert RopeSpec.from_key(spec.key).mrope_streams == spec.mrope_streams
    partial = RopeSpec(256, 64, 16, 2, is_neox, dtype, (11, 11, 10), True)
    assert RopeSpec.from_key(partial.key) == partial


def test_sections_are_stored_as_a_tuple():
    spec = RopeSpec(128, 128, 28, 4, True, torch.bfloat16, [16, 24, 24])
    assert spec.mrope_section == (16, 24, 24)
    assert spec == RopeSpec(128, 128, 28, 4, True, torch.bfloat16, (16, 24, 24))
    assert hash(spec) == hash(RopeSpec(128, 128, 28, 4, True, torch.bfloat16, (16, 24, 24)))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"mrope_section": (16, 24, 20)}, "mrope_section: expected sections summing to"),
        ({"mrope_section": (32, 32)}, "mrope_section: expected three non-negative ints"),
        ({"mrope_section": (16, 24, -24)}, "mrope_section: expected three non-negative ints"),
        ({"mrope_section": (16, 24, 24.0)}, "mrope_section: expected three non-negative ints"),
        ({"mrope_section": (True, 31, 32)}, "mrope_section: expected three non-negative ints"),
        ({"mrope_section": "16,24,24"}, "mrope_section: expected three ints"),
        ({"mrope_section": 64}, "mrope_section: expected three ints"),
        ({"mrope_interleaved": True}, "mrope_interleaved: needs mrope_section"),
        ({"mrope_section": (16, 24, 24), "mrope_interleaved": 1}, "mrope_interleaved: expected"),
        # The interleaved rule places height and width frequencies only every third one.
        (
            {"mrope_section": (16, 24, 24), "mrope_interleaved": True},
            r"mrope_section: the interleaved layout of \[16, 24, 24\] gives",
        ),
    ],
)
def test_bad_layouts_are_named(changes, message):
    fields = dict(head_size=128, rotary_dim=128, num_heads=8, num_kv_heads=2, is_neox=True,
                  dtype=torch.bfloat16)  # fmt: skip
    with pytest.raises(ValueError, match=f"^{message}"):
        RopeSpec(**fields, **changes)


@pytest.mark.parametrize(
    "key",
    [
        "q28_kv4_d128_r128_neox_bfloat16_mrope16-24",
        "q28_kv4_d128_r128_neox_bfloat16_mrope16_24_24",
        "q28_kv4_d128_r128_neox_bfloat16_mropex16-24-24",
        "q28_kv4_d128_r128_neox_bfloat16_mrope",
        "q28_kv4_d128_r128_neox_bfloat16mrope16-24-24",
    ],
)
def test_from_key_refuses_other_forms(key):
    with pytest.raises(ValueError, match=r"^spec key:.*_mrope<T>-<H>-<W>"):
        RopeSpec.from_key(key)


def test_from_key_refuses_bad_sections():
    with pytest.raises(ValueError, match="mrope_section"):
        RopeSpec.from_key("q28_kv4_d128_r128_neox_bfloat16_mrope16-24-20")
    with pytest.raises(ValueError, match="mrope_section"):
        RopeSpec.from_key("q28_kv4_d128_r128_neox_bfloat16_mropei16-24-24")


def test_bytes_moved_counts_three_positions():
    plain = RopeSpec(128, 128, 28, 4, True, torch.bfloat16)
    mrope = dataclasses.replace(plain, mrope_section=(16, 24, 24))
    assert mrope.bytes_moved(10) - plain.bytes_moved(10) == 10 * 2 * 8


# -- inputs --------------------------------------------------------------------------------------


def make_call(spec: RopeSpec, num_tokens: int, *, text_only=False, with_key=True, seed=0):
    """(positions, qkv, query, key, cache): q and k column slices of a fused qkv tensor;
    positions ``[3, T]`` sliced from a ``[3, T + 2]`` buffer (or ``[T]``)."""
    g = torch.Generator().manual_seed(seed)
    q_width, kv_width = spec.num_heads * spec.head_size, spec.num_kv_heads * spec.head_size
    qkv = torch.randn(num_tokens, q_width + 2 * kv_width, generator=g).to(spec.dtype)
    buffer = torch.randint(0, MAX_POSITION, (3, num_tokens + 2), generator=g)
    positions = buffer[0, :num_tokens].clone() if text_only else buffer[:, :num_tokens]
    query = qkv[:, :q_width]
    key = qkv[:, q_width : q_width + kv_width] if with_key else None
    cache = cos_sin_cache(MAX_POSITION, spec.rotary_dim)
    return positions, qkv, query, key, cache


def reference(spec, positions, query, key, cache):
    return rope_reference(
        positions, query, key, cache, spec.head_size, spec.is_neox,
        mrope_section=spec.mrope_section, mrope_interleaved=spec.mrope_interleaved,
    )  # fmt: skip


def assert_rotated_right(spec, fn, num_tokens, *, text_only=False, with_key=True):
    """``fn(positions, query, key, cache)`` rotates like the reference and leaves every other
    element of the fused qkv tensor bit-identical."""
    positions, qkv, query, key, cache = make_call(
        spec, num_tokens, text_only=text_only, with_key=with_key
    )
    before = qkv.clone()
    expected_q, expected_k = reference(spec, positions, query, key, cache)
    fn(positions, query, key, cache)
    assert_rope_close(query, expected_q, spec.dtype, "query")
    if key is not None:
        assert_rope_close(key, expected_k, spec.dtype, "key")
    heads = spec.num_heads + (spec.num_kv_heads if with_key else 0)
    untouched = torch.ones_like(qkv, dtype=torch.bool)
    untouched[:, : heads * spec.head_size].view(num_tokens, heads, -1)[..., : spec.rotary_dim] = (
        False
    )
    bits = {2: torch.int16, 4: torch.int32}[spec.dtype.itemsize]
    assert torch.equal(before.view(bits)[untouched], qkv.view(bits)[untouched])


# -- the reference -------------------------------------------------------------------------------


def _angles_from_sections(spec: RopeSpec, positions: torch.Tensor) -> torch.Tensor:
    """[T, half] angles written as vLLM's forward_native lays sections out (slices of per-stream
    tables), independent of the spec's stream map."""
    half = spec.rotary_dim // 2
    inv_freq = 10000.0 ** (-torch.arange(half, dtype=torch.float64) * 2 / spec.rotary_dim)
    per_stream = positions.double()[:, :, None] * inv_freq  # [3, T, half]
    t, h, w = spec.mrope_section
    if not spec.mrope_interleaved:
        return torch.cat(
            [per_stream[0, :, :t], per_stream[1, :, t : t + h], per_stream[2, :, t + h :]], -1
        )
    angles = per_stream[0].clone()
    angles[:, 1 : 3 * h : 3] = per_stream[1, :, 1 : 3 * h : 3]
    angles[:, 2 : 3 * w : 3] = per_stream[2, :, 2 : 3 * w : 3]
    return angles


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_reference_from_the_angles(spec):
    positions, _, query, key, cache = make_call(spec, 9)
    angle = _angles_from_sections(spec, positions)[:, None, :]
    half = spec.rotary_dim // 2
    got_q, _ = reference(spec, positions, query, key, cache)
    x = query.double().reshape(9, -1, spec.head_size).clone()
    if spec.is_neox:
        i1, i2 = torch.arange(half), torch.arange(half) + half
    else:
        i1, i2 = torch.arange(0, spec.rotary_dim, 2), torch.arange(1, spec.rotary_dim, 2)
    x1, x2 = x[..., i1].clone(), x[..., i2].clone()
    x[..., i1] = x1 * angle.cos() - x2 * angle.sin()
    x[..., i2] = x2 * angle.cos() + x1 * angle.sin()
    # The cache is float32 (angles rounded to 6e-8); a wrong stream is off by O(1).
    torch.testing.assert_close(got_q, x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_reference_text_only_is_plain_rope(spec):
    plain = dataclasses.replace(spec, mrope_section=None, mrope_interleaved=False)
    positions, _, query, key, cache = make_call(spec, 5, text_only=True)
    same = positions.expand(3, -1)
    expected = reference(plain, positions, query, key, cache)
    for pos in (positions, same):
        got = reference(spec, pos, query, key, cache)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


# -- providers -----------------------------------------------------------------------------------

TRITON_CONFIGS = [
    None,  # the default for the bucket
    {"block_t": 4, "block_h": 2, "head_split": 2, "num_warps": 2, "num_stages": 1},
]


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
@pytest.mark.parametrize("num_tokens", [1, 7])
def test_torch(spec, num_tokens):
    fn = get_provider("torch").callable_for(spec)
    for text_only, with_key in ((False, True), (False, False), (True, True)):
        assert_rotated_right(spec, fn, num_tokens, text_only=text_only, with_key=with_key)


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
@pytest.mark.parametrize("config", TRITON_CONFIGS, ids=["default", "blocked"])
def test_triton_mrope(spec, config):
    if spec.dtype != torch.float32 and config is not None:
        pytest.skip("one config per dtype keeps the interpreter quick")
    fn = get_provider(TRITON_MROPE).callable_for(spec, config)
    for num_tokens in (1, 7):
        for text_only, with_key in ((False, True), (False, False), (True, True)):
            assert_rotated_right(spec, fn, num_tokens, text_only=text_only, with_key=with_key)


@pytest.mark.slow
@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_torch_compile(spec):  # a compile per spec and call kind: seconds each
    fn = get_provider("torch_compile").callable_for(spec)
    for num_tokens in (1, 7):
        for text_only, with_key in ((False, True), (False, False), (True, True)):
            assert_rotated_right(spec, fn, num_tokens, text_only=text_only, with_key=with_key)


def test_apply_takes_the_layout_and_other_layouts():
    spec = SPECS[0]
    positions, _, query, key, cache = make_call(spec, 5)
    expected = reference(spec, positions, query, key, cache)
    # [T, H, D] views and [3, T] positions as int32.
    q3 = query.view(5, spec.num_heads, spec.head_size)
    k3 = key.view(5, spec.num_kv_heads, spec.head_size)
    for name in ("torch", TRITON_MROPE):
        q, k = q3.clone(), k3.clone()
        get_provider(name).apply(
            positions.int(), q, k, cache, head_size=spec.head_size, is_neox=spec.is_neox,
            mrope_section=spec.mrope_section,
        )  # fmt: skip
        assert_rope_close(q, expected[0], spec.dtype)
        assert_rope_close(k, expected[1], spec.dtype)


def test_plain_providers_refuse_mrope_specs():
    spec = SPECS[0]
    for name in ("triton", "flashinfer", "vllm"):
        reason = get_provider(name).unsupported_reason(spec)
        assert reason is not None and "mrope" in reason, (name, reason)
    plain = dataclasses.replace(spec, mrope_section=None)
    for name in (TRITON_MROPE, "vllm_mrope"):
        reason = get_provider(name).unsupported_reason(plain)
        assert reason is not None and "not rope" in reason, (name, reason)
    for name in ("torch", "torch_compile", TRITON_MROPE):
        assert get_provider(name).supports(spec) and get_provider(name).supports(
            spec, has_key=False
        )


def test_vllm_mrope_refuses_gptj_and_keyless():
    gptj = SPECS[1]
    assert "49290" in get_provider("vllm_mrope").unsupported_reason(gptj)
    neox = SPECS[0]
    assert get_provider("vllm_mrope").unsupported_reason(neox) is None
    assert "key" in get_provider("vllm_mrope").unsupported_reason(neox, has_key=False)


def test_vllm_mrope_unavailable_where_vllm_disabled_triton(monkeypatch):
    """vLLM swaps in a placeholder ``triton`` when its own Triton check fails (its kernels then
    die on ``triton.next_power_of_2``): the provider says so instead of failing at call time."""
    triton_utils = pytest.importorskip("vllm.triton_utils")
    monkeypatch.setattr(triton_utils, "HAS_TRITON", False)
    load_vllm_mrope.cache_clear()
    try:
        assert "disabled its Triton kernels" in load_vllm_mrope()
    finally:
        load_vllm_mrope.cache_clear()


# -- argument checks -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make_positions", "message"),
    [
        (lambda p: p[:2], r"positions: expected \[3, T\] .* got shape \(2, 5\)"),
        (lambda p: p[None], r"positions: expected \[3, T\] .* got shape \(1, 3, 5\)"),
        (lambda p: p.T.contiguous().T, r"positions: expected a contiguous last dimension"),
        (lambda p: p[:, :4], r"query: expected 4 tokens"),
        (lambda p: p.float(), r"positions: expected int64 or int32"),
    ],
)
def test_bad_positions_are_named(make_positions, message):
    spec = SPECS[0]
    positions, _, query, key, cache = make_call(spec, 5)
    positions = make_positions(positions.contiguous())
    with pytest.raises((ValueError, TypeError), match=message):
        get_provider("torch").apply(
            positions, query, key, cache, head_size=spec.head_size, is_neox=spec.is_neox,
            mrope_section=spec.mrope_section,
        )  # fmt: skip


def test_bad_section_in_apply_is_named():
    spec = SPECS[0]
    positions, _, query, key, cache = make_call(spec, 5)
    with pytest.raises(
        ValueError, match=r"^mrope_section: expected sections summing to rotary_dim // 2 = 8"
    ):
        get_provider("torch").apply(
            positions, query, key, cache, head_size=spec.head_size, is_neox=spec.is_neox,
            mrope_section=(4, 4, 4),
        )  # fmt: skip


def select(spec: RopeSpec, **kwargs):
    return select_rope(
        spec.head_size, spec.rotary_dim, spec.num_heads, spec.num_kv_heads, spec.is_neox,
        spec.dtype, "cpu", mrope_section=spec.mrope_section,
        mrope_interleaved=spec.mrope_interleaved, **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("debug", [False, True])
def test_selector_call_checks(debug):
    spec = SPECS[0]
    rope = select(spec, provider="torch", debug=debug)
    assert rope.spec == spec
    for text_only in (False, True):
        assert_rotated_right(spec, rope, 7, text_only=text_only)
    positions, qkv, query, key, cache = make_call(spec, 5)
    before = qkv.clone()
    for bad, message in (
        (positions[:2], r"positions: expected \[3, T\]"),
        (positions[:, :4], "query: expected 4 tokens"),
        (positions.int().T.contiguous().T, "positions: expected a contiguous last dimension"),
    ):
        with pytest.raises(ValueError, match=message):
            rope(bad, query, key, cache)
    with pytest.raises(ValueError, match="query: expected 4 heads"):
        rope(positions, key, None, cache)
    assert torch.equal(before, qkv)  # nothing written by a refused call
    if debug:
        with pytest.raises(ValueError, match="positions: expected values in"):
            rope(positions + MAX_POSITION, query, key, cache)


# -- the selector --------------------------------------------------------------------------------

TUNED = {"block_t": 2, "block_h": 1, "head_split": 4, "num_warps": 1, "num_stages": 1}


def _no_table_warnings(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RopeTableWarning)
        return fn(*args, **kwargs)


def test_selector_follows_an_mrope_entry(dirs):
    spec = SPECS[1]
    plain = dataclasses.replace(spec, mrope_section=None, mrope_interleaved=False)
    put(dirs["env"], make_table({
        spec.key: {"1": entry(TRITON_MROPE, TUNED, 5.0, torch=9.0),
                   "64": entry("torch", None, 8.0, **{TRITON_MROPE: 9.0})},
        plain.key: {"1": entry("triton", TUNED, 1.0)},
    }))  # fmt: skip
    rope = _no_table_warnings(select, spec)
    assert rope.buckets == (1, 64) and rope.spec_key == spec.key
    small, large = rope.explain(2), rope.explain(1000)
    assert (small.provider, dict(small.config)) == (TRITON_MROPE, TUNED)
    assert small.spec_key == spec.key and "exact spec" in small.why
    assert large.provider == "torch"
    assert_rotated_right(spec, rope, 3)
    assert_rotated_right(spec, rope, 3, text_only=True)
    # The plain spec of the same shape has its own entry, untouched by the mRoPE one.
    assert _no_table_warnings(select, plain).explain(1).provider == "triton"


def test_selector_nearest_spec_keeps_the_layout(dirs):
    spec = SPECS[1]
    plain = dataclasses.replace(spec, mrope_section=None, mrope_interleaved=False)
    chunked = dataclasses.replace(spec, mrope_interleaved=False)
    other_heads = dataclasses.replace(spec, num_heads=8)
    put(dirs["env"], make_table({
        plain.key: {"1": entry("triton", TUNED)},
        chunked.key: {"1": entry("torch", None)},
    }))  # fmt: skip
    # Neither a plain nor another layout's entry serves: the fallback, with the tune command.
    with pytest.warns(RopeTableWarning, match="--mrope-section 4,2,2 --mrope-interleaved"):
        rope = select(spec)
    assert rope.source is None and "fallback" in rope.explain(1).why
    put(dirs["env"], make_table({other_heads.key: {"1": entry(TRITON_MROPE, TUNED)}}))
    rope = _no_table_warnings(select, spec)
    assert rope.spec_key == other_heads.key and rope.explain(1).provider == TRITON_MROPE
    assert "nearest spec" in rope.explain(1).why


def test_selector_uses_no_model_for_mrope(dirs):
    spec = SPECS[0]
    put_model(dirs["env"], perf_model_data(torch_log_us=1.0, triton_log_us=0.0))
    with pytest.warns(RopeTableWarning, match="no tuning table entry"):
        rope = select(spec)
    assert "predicted" not in rope.explain(1).why and rope.explain(1).provider == "torch"


@dataclasses.dataclass(frozen=True)
class VllmMropeHere(VllmMropeProvider):
    """vLLM's mRoPE provider, said to be available on the CPU (never built by these tests)."""

    name: str = "vllm_mrope_here"

    def unavailable_reason(self, device):
        return None


def test_selector_never_runs_vllm_mrope_for_gptj(dirs, registered):
    registered(VllmMropeHere())
    gptj = SPECS[1]
    put(dirs["env"], make_table({
        gptj.key: {"1": entry("vllm_mrope_here", None, 1.0, torch=5.0)},
    }))  # fmt: skip
    rope = _no_table_warnings(select, gptj)
    explained = rope.explain(1)
    assert explained.provider == "torch"
    assert "vllm_mrope_here does not support this call" in explained.why
    assert "49290" in explained.why
    assert_rotated_right(gptj, rope, 5)


def test_table_validates_mrope_entries(dirs):
    spec = SPECS[2]
    path = put(dirs["user"], make_table({spec.key: {"16": entry(TRITON_MROPE, TUNED)}}))
    assert path.name == FILE and spec.key in read_table(path)["entries"]["graph"]
    bad = make_table({spec.key: {"16": entry(TRITON_MROPE, {**TUNED, "block_t": 3})}})
    with pytest.raises(TableError, match="block_t"):
        put(dirs["user"], bad)
    wrong_sum = spec.key.replace("_mropei6-3-3", "_mropei6-3-4")
    with pytest.raises(TableError, match="mrope_section"):
        put(dirs["user"], make_table({wrong_sum: {"16": entry("torch")}}))


def test_tolerances_cover_every_dtype():
    assert {s.dtype for s in SPECS} <= set(TOLERANCES)


def test_bench_refuses_mrope_specs():
    from autotune.bench import run_bench

    with pytest.raises(ValueError, match=r"multimodal \(mRoPE\).*benchmarks/mrope.py"):
        run_bench([SPECS[0]], [1], [1], "cpu")


# -- on a GPU (pytest -m gpu) --------------------------------------------------------------------

# The shapes benchmarks/mrope.py times, and a partial-rotary GPT-J one in every dtype.
GPU_SPECS = [
    RopeSpec(128, 128, 28, 4, True, torch.bfloat16, (16, 24, 24)),  # Qwen2.5-VL 7B
    RopeSpec(128, 128, 32, 8, True, torch.float16, (24, 20, 20), True),  # Qwen3-VL 8B
    RopeSpec(128, 128, 12, 2, False, torch.bfloat16, (16, 24, 24)),  # Qwen2-VL 2B, GPT-J
    RopeSpec(256, 64, 16, 2, False, torch.float32, (11, 11, 10), True),  # partial rotary
]
GPU_CONFIGS = [
    None,
    {"block_t": 4, "block_h": 4, "head_split": 2, "num_warps": 4, "num_stages": 2},
    {"block_t": 1, "block_h": 32, "head_split": 1, "num_warps": 8, "num_stages": 1},
]


@pytest.mark.gpu
@pytest.mark.parametrize("spec", GPU_SPECS, ids=spec_id)
@pytest.mark.parametrize("name", ["torch", TRITON_MROPE, "vllm_mrope"])
def test_providers_gpu(name, spec):
    from kernels.measure import check_correct, time_rope

    provider = get_provider(name)
    reason = provider.unavailable_reason("cuda:0") or provider.unsupported_reason(spec)
    if reason is not None:
        pytest.skip(f"{name}: {reason}")
    configs = GPU_CONFIGS if provider.tunable else [None]
    for config in configs:
        if config is not None and provider.config_problems(spec, config):
            continue
        fn = provider.callable_for(spec, config)
        # Fresh inputs at 101 tokens ([3, T] sliced, text-only [T], key-less): twice, so the
        # second call takes the fast launch path where there is one.
        for _ in range(2):
            check_correct(fn, spec, 101, "cuda:0", keyless=provider.supports(spec, has_key=False))
        # Captured in a CUDA graph (the stream map exists by then) and replayed.
        time_rope(fn, spec, 257, "cuda:0", repeats=2, min_round_s=0.0)


@pytest.mark.gpu
def test_selector_gpu_runs_triton_mrope_untuned(tmp_path):
    spec = GPU_SPECS[1]
    with pytest.warns(RopeTableWarning, match="no tuning table entry"):
        rope = select_rope(
            spec.head_size, spec.rotary_dim, spec.num_heads, spec.num_kv_heads, spec.is_neox,
            spec.dtype, "cuda:0", mrope_section=spec.mrope_section,
            mrope_interleaved=spec.mrope_interleaved, table_dir=tmp_path,
        )  # fmt: skip
    assert rope.explain(16).provider == TRITON_MROPE
    from kernels.measure import check_correct

    check_correct(rope, spec, 101, "cuda:0")
