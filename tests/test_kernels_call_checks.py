"""Every call of ``select_rope``'s callable checks its arguments' metadata against the spec:
a mismatch raises ``TypeError``/``ValueError`` naming the argument and writes nothing, instead of
reaching a kernel (which would read or write out of bounds). Valid calls over the contract's
matrix still match the float64 oracle. Positions outside the cache are caught by
``Provider.apply`` and by the selector's debug mode."""

from __future__ import annotations

import pytest
import torch
from _reference64 import Case, build_inputs, check_outputs, covering_matrix, seed_of, with_

from kernels import get_provider, select_rope

MATRIX = covering_matrix()
PROVIDERS = ("torch", "triton")


def _selector(case: Case, provider: str, **kwargs):
    return select_rope(
        case.head_size,
        case.rotary_dim,
        case.num_heads,
        case.num_kv_heads or case.num_heads,
        case.is_neox,
        case.dtype,
        "cpu",
        provider=provider,
        **kwargs,
    )


def _other_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype != torch.float32 else torch.float16


def _fewer_heads(x: torch.Tensor, head_size: int, heads: int) -> torch.Tensor | None:
    """``x`` with one head less (None when it has one head)."""
    if heads == 1:
        return None
    if x.shape[-1] == head_size and x.dim() >= 3 and x.shape[-2] == heads:  # [.., H, D]
        return x.narrow(-2, 0, heads - 1)
    return x.narrow(-1, 0, (heads - 1) * head_size)  # [.., H*D]


def _mismatches(case: Case, inputs) -> dict[str, tuple[tuple, type, str]]:
    """name -> ((positions, query, key, cache), error type, argument the message starts with)."""
    p, q, k, c = inputs.positions, inputs.query, inputs.key, inputs.cos_sin_cache
    D, Hq = case.head_size, case.num_heads
    like_q = {"dtype": q.dtype, "device": q.device}
    out: dict[str, tuple[tuple, type, str]] = {
        "query_fewer_tokens": ((p, q[:-1], k, c), ValueError, "query"),
        "positions_more_tokens": ((torch.cat([p.reshape(-1), p.reshape(-1)]), q, k, c),
                                  ValueError, "query"),
        "query_other_dtype": ((p, q.to(_other_dtype(case.dtype)), None, c), TypeError, "query"),
        "query_float64": ((p, q.double(), None, c), TypeError, "query"),
        "positions_float": ((p.float(), q, k, c), TypeError, "positions"),
        "positions_on_meta": ((p.to("meta"), q, k, c), ValueError, "positions"),
        "query_on_meta": ((p, q.to("meta"), None, c.to("meta")), ValueError, "query"),
        "cache_on_meta": ((p, q, k, c.to("meta")), ValueError, "cos_sin_cache"),
        "cache_other_width": ((p, q, k, c[:, : case.rotary_dim - 2]), ValueError,
                              "cos_sin_cache"),
        "cache_float64": ((p, q, k, c.double()), TypeError, "cos_sin_cache"),
        "query_strided_last_dim": (
            (p, torch.zeros(*q.shape[:-1], 2 * q.shape[-1], **like_q)[..., ::2], None, c),
            ValueError, "query"),
        "query_other_head_size": (
            (p, torch.zeros(case.num_tokens, Hq * (D + 2), **like_q), None, c),
            ValueError, "query"),
        "positions_not_a_tensor": ((p.tolist(), q, k, c), TypeError, "positions"),
    }  # fmt: skip
    fewer = _fewer_heads(q, D, Hq)
    if fewer is not None:
        out["query_fewer_heads"] = ((p, fewer, k, c), ValueError, "query")
    if k is not None:
        Hk = case.num_kv_heads
        out["key_fewer_tokens"] = ((p, q, k[:-1], c), ValueError, "key")
        out["key_other_dtype"] = ((p, q, k.to(_other_dtype(case.dtype)), c), TypeError, "key")
        out["key_on_meta"] = ((p, q, k.to("meta"), c), ValueError, "key")
        if Hq != Hk:
            out["key_with_query_heads"] = ((p, q, q, c), ValueError, "key")
        fewer = _fewer_heads(k, D, Hk)
        if fewer is not None:
            out["key_fewer_heads"] = ((p, q, fewer, c), ValueError, "key")
    return out


MISMATCH_NAMES = sorted(_mismatches(MATRIX[0], build_inputs(MATRIX[0], 0)))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", MATRIX, ids=lambda c: c.id)
def test_every_mismatch_raises_naming_the_argument_and_writes_nothing(case, provider, request):
    inputs = build_inputs(case, seed_of(request.node.nodeid))
    rope = _selector(case, provider)
    for name, (args, error, argument) in _mismatches(case, inputs).items():
        with pytest.raises(error, match=rf"^{argument}:") as info:
            rope(*args)
        for buffer_name, buffer in inputs.buffers.items():
            before = inputs.before[buffer_name]
            assert torch.equal(buffer.cpu(), before.cpu()), (name, buffer_name)
        assert info.value is not None, name
    if provider == "torch":  # (triton's valid calls below: its interpreter is slow)
        # The selector still serves a valid call after all those refusals.
        rope(inputs.positions, inputs.query, inputs.key, inputs.cos_sin_cache)
        check_outputs(inputs, case.dtype)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", MATRIX, ids=lambda c: c.id)
def test_valid_calls_match_the_float64_oracle(case, provider, request):
    seed = seed_of(request.node.nodeid)
    rope = _selector(case, provider)
    # New token counts through one selector; the Triton interpreter is slow: 7 tokens at most.
    counts = (case.num_tokens, 1, 5) if provider == "torch" else (min(case.num_tokens, 7), 1)
    for i, num_tokens in enumerate(counts):
        inputs = build_inputs(with_(case, num_tokens=num_tokens), seed + i)
        rope(inputs.positions, inputs.query, inputs.key, inputs.cos_sin_cache)
        check_outputs(inputs, case.dtype)


def test_mismatch_matrix_covers_the_issue():
    # Token counts of positions, query and key; head counts and head size; devices; dtypes.
    for wanted in ("query_fewer_tokens", "key_fewer_tokens", "query_fewer_heads",
                   "key_fewer_heads", "query_other_head_size", "positions_on_meta",
                   "query_other_dtype", "key_other_dtype", "cache_other_width"):  # fmt: skip
        assert any(wanted in _mismatches(c, build_inputs(c, 0)) for c in MATRIX), (
            f"no case exercises {wanted}"
        )


# -- positions outside the cache -------------------------------------------------------------

CASE = Case(head_size=64, rotary_dim=32, num_heads=4, num_kv_heads=2, num_tokens=8)


def _out_of_cache(value: int):
    inputs = build_inputs(CASE, 0)
    positions = inputs.positions.clone()
    positions[3] = value
    return inputs, positions


@pytest.mark.parametrize("value", [-1, "rows"])
@pytest.mark.parametrize("provider", ["torch", "torch_compile", "triton"])
def test_apply_refuses_positions_outside_the_cache(provider, value):
    inputs, positions = _out_of_cache(-1)
    if value == "rows":
        positions[3] = inputs.cos_sin_cache.shape[0]
    with pytest.raises(ValueError, match=r"^positions: expected values in \[0, "):
        get_provider(provider).apply(
            positions, inputs.query, inputs.key, inputs.cos_sin_cache,
            head_size=CASE.head_size, is_neox=CASE.is_neox,
        )  # fmt: skip
    for name, buffer in inputs.buffers.items():
        assert torch.equal(buffer, inputs.before[name])


@pytest.mark.parametrize("provider", PROVIDERS)
def test_debug_mode_refuses_positions_outside_the_cache(provider):
    inputs, positions = _out_of_cache(10**6)
    with pytest.raises(ValueError, match=r"^positions: expected values in \[0, "):
        _selector(CASE, provider, debug=True)(
            positions, inputs.query, inputs.key, inputs.cos_sin_cache
        )
    for name, buffer in inputs.buffers.items():
        assert torch.equal(buffer, inputs.before[name])
    valid = build_inputs(CASE, 1)
    _selector(CASE, provider, debug=True)(
        valid.positions, valid.query, valid.key, valid.cos_sin_cache
    )
    check_outputs(valid, CASE.dtype)


# -- GPU -----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("case", MATRIX[::4], ids=lambda c: c.id)
def test_every_mismatch_raises_on_cuda(case, request):
    """The CUDA fast path (get_device() compares) and the full check, over the same mismatches,
    plus tensors left on the CPU; valid calls through the table's choice match the oracle."""
    seed = seed_of(request.node.nodeid)
    inputs = build_inputs(case, seed, "cuda")
    rope = select_rope(
        case.head_size, case.rotary_dim, case.num_heads, case.num_kv_heads or case.num_heads,
        case.is_neox, case.dtype, "cuda",
    )  # fmt: skip
    p, q, k, c = inputs.positions, inputs.query, inputs.key, inputs.cos_sin_cache
    mismatches = _mismatches(case, inputs)
    mismatches["positions_on_cpu"] = ((p.cpu(), q, k, c), ValueError, "positions")
    mismatches["cache_on_cpu"] = ((p, q, k, c.cpu()), ValueError, "cos_sin_cache")
    mismatches["query_on_cpu"] = ((p, q.cpu(), None, c), ValueError, "query")
    for name, (args, error, argument) in mismatches.items():
        with pytest.raises(error, match=rf"^{argument}:"):
            rope(*args)
        torch.cuda.synchronize()
        for buffer_name, buffer in inputs.buffers.items():
            before = inputs.before[buffer_name]
            assert torch.equal(buffer.cpu(), before.cpu()), (name, buffer_name)
    rope(p, q, k, c)
    torch.cuda.synchronize()
    check_outputs(inputs, case.dtype, 2.0)  # vLLM's op, if chosen, rounds in the element type
