"""Host-side checks at the public boundary: shapes, dtypes, strides and devices only.

Nothing here touches device memory: no synchronization, no allocation, so the checks are safe
on the hot path and inside CUDA graph capture.
"""

from __future__ import annotations

import torch

from ._spec import RopeSpec

__all__ = ["Layout", "check_rope_args", "qk_layout"]

_QK_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_POSITION_DTYPES = (torch.int32, torch.int64)

# (num_tokens, num_heads, token_stride, head_stride) of a query or key tensor, in elements.
Layout = tuple[int, int, int, int]


def qk_layout(name: str, x: torch.Tensor, head_size: int, num_tokens: int) -> Layout:
    """Read a query or key tensor as ``[tokens, heads, head_size]`` without making a view.

    Accepts ``[T, H*D]``, ``[T, H, D]``, ``[B, S, H*D]`` and ``[B, S, H, D]`` with any token and
    head strides (column slices of a fused qkv tensor, head-padded buffers), as long as the last
    dimension is contiguous and the batch and sequence dimensions flatten without a copy.
    A 3-D tensor reads as ``[T, H, D]`` when its first dimension is the token count (taken from
    ``positions``, as vLLM does) and its last is ``head_size``, else as ``[B, S, H*D]``.

    Raises:
        ValueError: the shape or strides do not fit the contract; the message names ``name``.
    """
    shape, strides = x.shape, x.stride()
    ndim = len(shape)
    if ndim not in (2, 3, 4):
        raise ValueError(
            f"{name}: expected [T, H*D], [T, H, D], [B, S, H*D] or [B, S, H, D], got shape "
            f"{tuple(shape)}"
        )
    if shape[-1] > 1 and strides[-1] != 1:
        raise ValueError(f"{name}: expected a contiguous last dimension, got strides {strides}")
    # Heads packed in the last dimension ([.., H*D]) or given their own dimension ([.., H, D]).
    packed = ndim == 2 or (ndim == 3 and not (shape[0] == num_tokens and shape[-1] == head_size))
    if packed:
        width = shape[-1]
        if width % head_size:
            raise ValueError(
                f"{name}: expected a last dimension that is a multiple of head_size={head_size}, "
                f"got {width}"
            )
        num_heads, head_stride = width // head_size, head_size
        token_dims = ndim - 1
    else:
        if shape[-1] != head_size:
            raise ValueError(
                f"{name}: expected a last dimension of head_size={head_size}, got shape "
                f"{tuple(shape)}"
            )
        num_heads, head_stride = shape[-2], strides[-2]
        token_dims = ndim - 2
    if token_dims == 1:
        return shape[0], num_heads, strides[0], head_stride
    batch, seq = shape[0], shape[1]
    if seq == 1:  # [B, 1, ...] (e.g. unsqueeze(1)): tokens step along the batch dimension
        return batch, num_heads, strides[0], head_stride
    if batch > 1 and seq > 0 and strides[0] != seq * strides[1]:
        raise ValueError(
            f"{name}: expected [B, S, ...] whose batch and sequence dimensions flatten without a "
            f"copy (stride(0) == S * stride(1)), got strides {strides}"
        )
    return batch * seq, num_heads, strides[1], head_stride


def check_rope_args(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    cos_sin_cache: torch.Tensor,
    head_size: int,
    is_neox: bool,
) -> tuple[RopeSpec, Layout, Layout | None]:
    """Validate one RoPE call against the contract and return its spec and layouts.

    Raises:
        TypeError: a dtype or argument type is wrong.
        ValueError: a shape, stride or device is wrong.
    """
    for name, t in (("positions", positions), ("query", query), ("cos_sin_cache", cos_sin_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if key is not None and not isinstance(key, torch.Tensor):
        raise TypeError(f"key: expected a torch.Tensor or None, got {type(key).__name__}")
    if not isinstance(head_size, int) or isinstance(head_size, bool) or head_size <= 0:
        raise ValueError(f"head_size: expected a positive int, got {head_size!r}")
    if positions.dtype not in _POSITION_DTYPES:
        raise TypeError(f"positions: expected int64 or int32, got {positions.dtype}")
    if query.dtype not in _QK_DTYPES:
        raise TypeError(f"query: expected float16, bfloat16 or float32, got {query.dtype}")
    if key is not None and key.dtype != query.dtype:
        raise TypeError(f"key: expected the query's dtype {query.dtype}, got {key.dtype}")
    if cos_sin_cache.dtype not in (torch.float32, query.dtype):
        raise TypeError(
            f"cos_sin_cache: expected float32 or the query's dtype {query.dtype}, got "
            f"{cos_sin_cache.dtype}"
        )
    device = query.device
    for name, t in (("positions", positions), ("key", key), ("cos_sin_cache", cos_sin_cache)):
        if t is not None and t.device != device:
            raise ValueError(f"{name}: expected the query's device {device}, got {t.device}")

    if positions.dim() not in (1, 2):
        raise ValueError(f"positions: expected [T] or [B, S], got shape {tuple(positions.shape)}")
    num_tokens = positions.numel()
    q_layout = qk_layout("query", query, head_size, num_tokens)
    if q_layout[0] != num_tokens:
        raise ValueError(
            f"query: expected {num_tokens} tokens (positions has {num_tokens}), got shape "
            f"{tuple(query.shape)}"
        )
    # Kernels (ours, vLLM's, FlashInfer's) read positions as a dense [T] array.
    if not positions.is_contiguous():
        raise ValueError(
            f"positions: expected a contiguous tensor, got shape {tuple(positions.shape)} with "
            f"strides {positions.stride()}"
        )
    k_layout = None
    if key is not None:
        k_layout = qk_layout("key", key, head_size, num_tokens)
        if k_layout[0] != num_tokens:
            raise ValueError(
                f"key: expected {num_tokens} tokens (query's), got shape {tuple(key.shape)}"
            )
        if q_layout[1] % k_layout[1]:
            raise ValueError(
                f"key: expected a head count dividing the query's {q_layout[1]}, got {k_layout[1]}"
            )
    if cos_sin_cache.dim() != 2:
        raise ValueError(
            f"cos_sin_cache: expected [max_position, rotary_dim], got shape "
            f"{tuple(cos_sin_cache.shape)}"
        )
    rotary_dim = cos_sin_cache.shape[1]
    if rotary_dim % 2 or rotary_dim > head_size or rotary_dim == 0:
        raise ValueError(
            f"cos_sin_cache: expected a width (rotary_dim) that is even and at most "
            f"head_size={head_size}, got {rotary_dim}"
        )
    if cos_sin_cache.stride(1) != 1:
        raise ValueError(
            f"cos_sin_cache: expected a contiguous last dimension, got strides "
            f"{cos_sin_cache.stride()}"
        )
    spec = RopeSpec(
        head_size=head_size,
        rotary_dim=rotary_dim,
        num_heads=q_layout[1],
        num_kv_heads=k_layout[1] if k_layout is not None else q_layout[1],
        is_neox=is_neox,
        dtype=query.dtype,
    )
    return spec, q_layout, k_layout
