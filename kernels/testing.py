"""For testing providers: a float64 RoPE reference and the tolerances every provider must meet.

Used by the tuner's correctness gate and by tests; serving code does not need it.
"""

from __future__ import annotations

import torch

from ._checks import check_rope_args

__all__ = ["TOLERANCES", "assert_rope_close", "rope_reference"]

# (atol, rtol) per element dtype of q/k. Outputs are computed in float32 and rounded once to
# the element type, so the error budget is one rounding of that type (bf16: 2^-8 relative,
# fp16: 2^-11) plus float32 arithmetic; random inputs are O(1).
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def rope_reference(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    cos_sin_cache: torch.Tensor,
    head_size: int,
    is_neox: bool,
    *,
    mrope_section: tuple[int, int, int] | None = None,
    mrope_interleaved: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Out-of-place float64 RoPE: returns ``(query, key)`` as float64 ``[T, H, head_size]``.

    Inputs are left untouched. The cache's values are used as given (upcast), so the only error
    a provider may add is its own arithmetic and final rounding.

    With ``mrope_section`` (multimodal RoPE), frequency ``j`` of token ``t`` takes its angle
    from the cache row ``positions[stream(j), t]``, ``stream`` being the layout's map
    (:attr:`kernels.RopeSpec.mrope_streams`); ``[T]`` positions stand for all three streams.
    """
    spec, _, _ = check_rope_args(
        positions, query, key, cos_sin_cache, head_size, is_neox,
        mrope_section=mrope_section, mrope_interleaved=mrope_interleaved,
    )  # fmt: skip
    half = spec.rotary_dim // 2
    if spec.is_mrope:
        num_tokens = positions.shape[-1]
        streams = positions.long().reshape(-1, num_tokens).expand(3, num_tokens)
        stream_of = torch.tensor(spec.mrope_streams, device=positions.device)
    else:
        num_tokens = positions.numel()
        streams = positions.reshape(1, -1).long()
        stream_of = torch.zeros(half, dtype=torch.long, device=positions.device)
    # [T, half]: the position each frequency of each token takes its angle from.
    pos = streams[stream_of].T
    freq = torch.arange(half, device=positions.device)
    cache = cos_sin_cache.double()
    cos, sin = cache[pos, freq][:, None, :], cache[pos, freq + half][:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(num_tokens, -1, head_size).double().clone()
        rot = x[..., : spec.rotary_dim]
        if is_neox:
            x1, x2 = rot[..., :half], rot[..., half:]
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
        o1, o2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        if is_neox:
            x[..., : spec.rotary_dim] = torch.cat([o1, o2], dim=-1)
        else:
            x[..., : spec.rotary_dim] = torch.stack([o1, o2], dim=-1).flatten(-2)
        return x

    return rotate(query), (rotate(key) if key is not None else None)


def assert_rope_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str = "output"
) -> None:
    """Raise AssertionError when ``actual`` is off the float64 ``expected`` beyond ``dtype``'s
    tolerance (NaN never passes)."""
    atol, rtol = TOLERANCES[dtype]
    actual = actual.reshape(expected.shape).double().cpu()
    expected = expected.cpu()
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    bad = ~(err <= bound)  # NaN compares False, so it lands in bad
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements off for {dtype} "
            f"(atol={atol}, rtol={rtol}); first at {idx}: got {actual[idx].item()}, "
            f"expected {expected[idx].item()}, max abs error {err.nan_to_num(float('inf')).max()}"
        )
