"""The standard RoPE cos/sin cache, in the layout every provider reads."""

from __future__ import annotations

import torch

__all__ = ["cos_sin_cache"]


def cos_sin_cache(
    max_position: int,
    rotary_dim: int,
    base: float = 10000.0,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Build the standard RoPE cache: ``[max_position, rotary_dim]``, cos half then sin half.

    Row ``p`` holds ``cos(p * f_i)`` for ``i < rotary_dim/2`` followed by ``sin(p * f_i)``, with
    ``f_i = base ** (-2i / rotary_dim)``. Computed in float64, then cast to ``dtype``.

    Raises:
        ValueError: ``max_position`` is not positive or ``rotary_dim`` is not a positive even int.
    """
    if not isinstance(max_position, int) or max_position <= 0:
        raise ValueError(f"max_position: expected a positive int, got {max_position!r}")
    if not isinstance(rotary_dim, int) or rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim: expected a positive even int, got {rotary_dim!r}")
    if not base > 0:
        raise ValueError(f"base: expected a positive number, got {base!r}")
    inv_freq = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.outer(torch.arange(max_position, dtype=torch.float64), inv_freq)
    cache = torch.cat([angles.cos(), angles.sin()], dim=-1)
    return cache.to(dtype=dtype, device=device)
