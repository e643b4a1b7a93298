"""``torch``: eager PyTorch written from the math; runs wherever PyTorch runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .._checks import qk_layout
from .._spec import RopeSpec
from ._base import MROPE, ROPE, Config, Provider, RopeFn, register_provider
from ._mrope_streams import stream_tensor

__all__ = ["TorchProvider", "as_token_head_view", "rope_torch_"]


def as_token_head_view(name: str, x: torch.Tensor, head_size: int, num_tokens: int) -> torch.Tensor:
    """``x`` as a ``[T, H, head_size]`` view of the same memory (no copy)."""
    tokens, heads, token_stride, head_stride = qk_layout(name, x, head_size, num_tokens)
    return x.as_strided((tokens, heads, head_size), (token_stride, head_stride, 1))


def rope_torch_(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    cos_sin_cache: torch.Tensor,
    rotary_dim: int,
    is_neox: bool,
    stream_index: torch.Tensor | None = None,
) -> None:
    """RoPE on ``[T, H, D]`` views, in place, arithmetic in float32.

    With ``stream_index`` (multimodal RoPE: an int64 ``[rotary_dim]`` tensor, the stream of
    each cos/sin column) and ``[3, T]`` positions, each column comes from the cache row of its
    stream's position; ``[T]`` positions are text only (every stream alike).
    """
    half = rotary_dim // 2
    if stream_index is not None and positions.dim() == 2:
        rows = cos_sin_cache[positions]  # [3, T, rotary_dim]: each stream's row
        index = stream_index.view(1, 1, rotary_dim).expand(1, rows.shape[1], rotary_dim)
        cos_sin = rows.gather(0, index)[0].float()
    else:
        cos_sin = cos_sin_cache.index_select(0, positions.reshape(-1)).float()
    cos, sin = cos_sin[:, None, :half], cos_sin[:, None, half:]
    for x in (query, key):
        if x is None:
            continue
        rot = x[..., :rotary_dim]
        if is_neox:
            x1, x2 = rot[..., :half].float(), rot[..., half:].float()
        else:
            x1, x2 = rot[..., 0::2].float(), rot[..., 1::2].float()
        o1 = x1 * cos - x2 * sin
        o2 = x2 * cos + x1 * sin
        if is_neox:
            rot.copy_(torch.cat((o1, o2), dim=-1))
        else:
            rot.copy_(torch.stack((o1, o2), dim=-1).flatten(-2))


@dataclass(frozen=True)
class TorchProvider(Provider):
    name: str = "torch"
    description: str = "eager PyTorch ops, written from the math; CPU and GPU"
    reference: bool = True  # every spec, every device PyTorch runs on
    layouts: tuple[str, ...] = (ROPE, MROPE)

    def build(self, spec: RopeSpec, config: Config) -> RopeFn:
        head_size, rotary_dim, is_neox = spec.head_size, spec.rotary_dim, spec.is_neox
        if spec.is_mrope:

            def rope(positions, q, k, cos_sin_cache, stream_index):
                rope_torch_(positions, q, k, cos_sin_cache, rotary_dim, is_neox, stream_index)

            return _mrope_run(spec, rope)

        def run(positions, query, key, cos_sin_cache):
            n = positions.numel()
            q = as_token_head_view("query", query, head_size, n)
            k = None if key is None else as_token_head_view("key", key, head_size, n)
            rope_torch_(positions, q, k, cos_sin_cache, rotary_dim, is_neox)

        return run


def _mrope_run(spec: RopeSpec, rope: Callable) -> RopeFn:
    """A multimodal spec's callable around ``rope(positions, q, k, cos_sin_cache,
    stream_index)`` (:func:`rope_torch_` for the spec): ``[T, H, D]`` views with ``T`` the
    positions' last dimension, and the spec's stream index on the call's device."""
    head_size, rotary_dim = spec.head_size, spec.rotary_dim
    streams = spec.mrope_streams

    def run(positions, query, key, cos_sin_cache):
        n = positions.shape[-1]
        q = as_token_head_view("query", query, head_size, n)
        k = None if key is None else as_token_head_view("key", key, head_size, n)
        index = stream_tensor(streams, rotary_dim, torch.int64, positions.device)
        rope(positions, q, k, cos_sin_cache, index)

    return run


register_provider(TorchProvider())
