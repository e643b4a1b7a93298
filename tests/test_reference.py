"""The test oracle itself, and kernels.testing checked against it.

The provider tests trust ``_reference64.rope64`` and ``check_outputs``; these tests show the
oracle is right (hand-worked values, a complex-number formulation, rotation invariants) and that
the harness catches the faults it exists to catch.
"""

from __future__ import annotations

import math

import pytest
import torch
from _reference64 import (
    LAYOUTS,
    Case,
    build_inputs,
    check_outputs,
    covering_matrix,
    make_cache,
    rope64,
    seed_of,
    views_of,
)

from kernels import cos_sin_cache
from kernels.testing import TOLERANCES, assert_rope_close, rope_reference

# One row: cos = (0.5, -1), sin = (0.25, 2); x = (1, 2, 3, 4) then a tail (5, 6).
ROW = torch.tensor([[0.5, -1.0, 0.25, 2.0]], dtype=torch.float64)
X = torch.tensor([[[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]], dtype=torch.float64)


@pytest.mark.parametrize(
    ("is_neox", "want"),
    [
        # NeoX pairs (0, 2) and (1, 3): 1*.5 - 3*.25, 2*-1 - 4*2, 3*.5 + 1*.25, 4*-1 + 2*2.
        (True, [-0.25, -10.0, 1.75, 0.0, 5.0, 6.0]),
        # GPT-J pairs (0, 1) and (2, 3): 1*.5 - 2*.25, 2*.5 + 1*.25, 3*-1 - 4*2, 4*-1 + 3*2.
        (False, [0.0, 1.25, -11.0, 2.0, 5.0, 6.0]),
    ],
)
def test_rope64_hand_worked(is_neox, want):
    out, _ = rope64(X, torch.tensor([0]), ROW, is_neox)
    assert out[0, 0].tolist() == want


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize(("head_size", "rotary_dim"), [(64, 64), (96, 24), (128, 32)])
def test_rope64_is_complex_multiplication(is_neox, head_size, rotary_dim, request):
    """RoPE multiplies each pair, read as a complex number, by ``cos + i sin``."""
    gen = torch.Generator().manual_seed(seed_of(request.node.nodeid))
    half = rotary_dim // 2
    x = torch.randn(5, 3, head_size, dtype=torch.float64, generator=gen)
    cache = make_cache("random", 50, rotary_dim, torch.float64, gen)
    positions = torch.randint(0, 50, (5,), generator=gen)
    out, _ = rope64(x, positions, cache, is_neox)

    rot = cache[positions]
    turn = torch.complex(rot[:, None, :half], rot[:, None, half:])
    if is_neox:
        z = torch.complex(x[..., :half], x[..., half:rotary_dim]) * turn
        want = torch.cat((z.real, z.imag), dim=-1)
    else:
        pairs = x[..., :rotary_dim].reshape(5, 3, half, 2)
        z = torch.view_as_complex(pairs.contiguous()) * turn
        want = torch.view_as_real(z).reshape(5, 3, rotary_dim)
    torch.testing.assert_close(out[..., :rotary_dim], want, rtol=1e-13, atol=1e-13)
    assert torch.equal(out[..., rotary_dim:], x[..., rotary_dim:])


@pytest.mark.parametrize("is_neox", [True, False])
def test_rope64_real_cache_is_a_rotation(is_neox, request):
    """With the standard cache: position 0 is the identity, pair norms are kept, and the dot
    product of a rotated q and k depends only on their position difference."""
    gen = torch.Generator().manual_seed(seed_of(request.node.nodeid))
    cache = make_cache("rope", 512, 64, torch.float64, gen)
    x = torch.randn(4, 2, 64, dtype=torch.float64, generator=gen)
    at_zero, _ = rope64(x, torch.zeros(4, dtype=torch.long), cache, is_neox)
    torch.testing.assert_close(at_zero, x, rtol=0, atol=0)
    out, _ = rope64(x, torch.tensor([1, 10, 100, 511]), cache, is_neox)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)

    q, k = x[0:1, :1], x[1:2, :1]
    dots = []
    for shift in (0, 7, 300):
        rq, _ = rope64(q, torch.tensor([shift + 50]), cache, is_neox)
        rk, _ = rope64(k, torch.tensor([shift + 20]), cache, is_neox)
        dots.append((rq * rk).sum().item())
    assert dots[0] == pytest.approx(dots[1], rel=1e-10)
    assert dots[0] == pytest.approx(dots[2], rel=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotary_dim", [16, 24, 128])
def test_kernels_cos_sin_cache_matches_the_formula(dtype, rotary_dim):
    gen = torch.Generator().manual_seed(0)
    want = make_cache("rope", 300, rotary_dim, dtype, gen)
    got = cos_sin_cache(300, rotary_dim, dtype=dtype)
    assert got.shape == (300, rotary_dim) and got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # Spot value: row p, pair i holds cos(p * 10000**(-2i/R)).
    i, p = rotary_dim // 2 - 1, 299
    angle = p * 10000.0 ** (-2 * i / rotary_dim)
    assert float(got[p, i]) == pytest.approx(math.cos(angle), abs=1e-2)
    assert float(got[p, rotary_dim // 2 + i]) == pytest.approx(math.sin(angle), abs=1e-2)


@pytest.mark.parametrize(
    "case",
    [
        Case(layout=layout, num_kv_heads=kv, is_neox=neox, num_tokens=6)
        for layout, kv, neox in zip(
            LAYOUTS, [2, None, 4, 1, 2, None, 2, 4, 8], [True, False] * 5, strict=False
        )
    ]
    + [Case(head_size=96, rotary_dim=24, is_neox=False, cache_dtype="same")],
    ids=lambda case: case.id,
)
def test_kernels_rope_reference_agrees(case, request):
    inputs = build_inputs(case, seed_of(request.node.nodeid))
    q_before = inputs.query.clone()
    q, k = rope_reference(
        inputs.positions,
        inputs.query,
        inputs.key,
        inputs.cos_sin_cache,
        head_size=case.head_size,
        is_neox=case.is_neox,
    )
    assert torch.equal(inputs.query, q_before), "rope_reference must not write its inputs"
    T, D = case.num_tokens, case.head_size
    views = views_of(case, inputs.expected)
    torch.testing.assert_close(q, views[0].view(T, -1, D), rtol=1e-12, atol=1e-12)
    if case.num_kv_heads is None:
        assert k is None
    else:
        torch.testing.assert_close(k, views[1].view(T, -1, D), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_assert_rope_close_catches_errors(dtype):
    expected = torch.randn(4, 2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    actual = expected.to(dtype)
    assert_rope_close(actual, expected, dtype)
    atol, rtol = TOLERANCES[dtype]
    off = actual.double().clone()
    off[1, 1, 3] += 4 * (atol + rtol * abs(float(off[1, 1, 3])))
    with pytest.raises(AssertionError, match="1 of 64"):
        assert_rope_close(off, expected, dtype)
    nan = actual.clone()
    nan[0, 0, 0] = float("nan")
    with pytest.raises(AssertionError):
        assert_rope_close(nan, expected, dtype)


def _write_oracle(case, inputs):
    """Do the op's job by hand: the oracle's values, rounded to the element type."""
    for name, buffer in inputs.buffers.items():
        mask = inputs.rotated[name]
        buffer[mask] = inputs.expected[name][mask].to(buffer.dtype)


@pytest.mark.parametrize("layout", ["qkv", "bs_padded"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_check_outputs_catches_faults(layout, dtype, request):
    """The harness passes a correct result and fails a skipped head, a wrong value, a written
    tail, a written v column or padding, so the provider tests can fail."""
    case = Case(layout=layout, dtype=dtype, head_size=128, rotary_dim=64, num_tokens=6)
    seed = seed_of(request.node.nodeid)

    inputs = build_inputs(case, seed)
    _write_oracle(case, inputs)
    check_outputs(inputs, dtype)

    inputs = build_inputs(case, seed)  # one head of one token left as it was
    _write_oracle(case, inputs)
    before_q = views_of(case, inputs.before)[0].view(6, -1, 128)
    inputs.query.view(6, -1, 128)[3, 5, :64] = before_q[3, 5, :64]
    with pytest.raises(AssertionError, match="rotated elements off"):
        check_outputs(inputs, dtype)

    inputs = build_inputs(case, seed)  # one value a little past the tolerance
    _write_oracle(case, inputs)
    value = inputs.query.view(6, -1, 128)[0, 0, 1]
    value += 3 * (1e-5 + torch.finfo(dtype).eps * value.abs())
    with pytest.raises(AssertionError, match="rotated elements off"):
        check_outputs(inputs, dtype)

    inputs = build_inputs(case, seed)  # the untouched tail of a head written
    _write_oracle(case, inputs)
    inputs.key.view(6, -1, 128)[5, 1, 100] += 1
    with pytest.raises(AssertionError, match="outside the rotated region"):
        check_outputs(inputs, dtype)

    inputs = build_inputs(case, seed)  # a v column / padding element written
    _write_oracle(case, inputs)
    buffer = next(iter(inputs.buffers.values()))
    buffer[..., -1] += 1
    with pytest.raises(AssertionError, match="outside the rotated region"):
        check_outputs(inputs, dtype)


def test_matrix_covers_every_value():
    """Every value of every dimension appears in the CPU/GPU matrix, in both styles."""
    cases = covering_matrix()
    for neox in (True, False):
        some = [c for c in cases if c.is_neox == neox]
        assert {(c.head_size, c.rotary_dim) for c in some} >= {(128, 32), (256, 64), (80, 32)}
    assert {c.head_size for c in cases} >= {64, 80, 128, 256}
    assert {c.layout for c in cases} == set(LAYOUTS)
    assert {c.dtype for c in cases} == {torch.float16, torch.bfloat16, torch.float32}
    assert {c.num_tokens for c in cases} == {1, 7, 33}
    assert {c.positions_dtype for c in cases} == {torch.int32, torch.int64}
    assert {c.cache_dtype for c in cases} == {"float32", "same"}
    assert any(c.near_max for c in cases)
    assert any(c.num_kv_heads is None for c in cases)
    assert any(c.num_kv_heads is not None and c.num_kv_heads < c.num_heads for c in cases)
    assert len({c.id for c in cases}) == len(cases)
