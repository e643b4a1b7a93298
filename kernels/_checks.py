"""Checks at the public boundary.

:func:`check_rope_args`, :func:`qk_layout` and :func:`call_checker` read tensor metadata only
(shapes, dtypes, strides, devices): no synchronization, no allocation, so they are safe on the
hot path and inside CUDA graph capture. :func:`check_positions_in_cache` reads the positions
themselves (a host-device sync on CUDA): it runs in ``Provider.apply`` and in the selector's
debug mode only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._spec import RopeSpec

__all__ = [
    "CallCheck",
    "Layout",
    "call_checker",
    "check_positions_in_cache",
    "check_rope_args",
    "check_spec_args",
    "qk_layout",
]

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
    expected: RopeSpec | None = None,
    *,
    mrope_section: tuple[int, int, int] | None = None,
    mrope_interleaved: bool = False,
) -> tuple[RopeSpec, Layout, Layout | None]:
    """Validate one RoPE call against the contract and return its spec and layouts.

    With ``expected``, the query's dtype and the head counts must be its own, checked as soon
    as each is read (so a query with too few heads is named, not the key it no longer fits);
    its multimodal layout, if any, replaces ``mrope_section`` and ``mrope_interleaved``.

    A multimodal (mRoPE) call takes positions ``[3, T]`` (time, height and width streams; the
    last dimension contiguous, any stride between streams, as a slice of a longer buffer is)
    or ``[T]`` (text only: all three streams equal), never ``[B, S]``.

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
    if expected is not None and query.dtype != expected.dtype:
        raise TypeError(f"query: expected {expected.dtype}, got {query.dtype}")
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

    if expected is not None:
        mrope_section, mrope_interleaved = expected.mrope_section, expected.mrope_interleaved
    if mrope_section is not None:
        num_tokens = _mrope_positions_tokens(positions)
    elif positions.dim() not in (1, 2):
        raise ValueError(f"positions: expected [T] or [B, S], got shape {tuple(positions.shape)}")
    else:
        num_tokens = positions.numel()
    q_layout = qk_layout("query", query, head_size, num_tokens)
    if q_layout[0] != num_tokens:
        raise ValueError(
            f"query: expected {num_tokens} tokens (positions has {num_tokens}), got shape "
            f"{tuple(query.shape)}"
        )
    if expected is not None and q_layout[1] != expected.num_heads:
        raise ValueError(f"query: expected {expected.num_heads} heads, got {q_layout[1]}")
    # Kernels (ours, vLLM's, FlashInfer's) read positions as a dense [T] array.
    if mrope_section is None and not positions.is_contiguous():
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
        if expected is not None and k_layout[1] != expected.num_kv_heads:
            raise ValueError(f"key: expected {expected.num_kv_heads} heads, got {k_layout[1]}")
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
        mrope_section=mrope_section,
        mrope_interleaved=mrope_interleaved,
    )
    return spec, q_layout, k_layout


def _mrope_positions_tokens(positions: torch.Tensor) -> int:
    """The token count of a multimodal call's positions (``[3, T]`` or ``[T]``), after checking
    their shape and strides."""
    shape = tuple(positions.shape)
    if positions.dim() == 1:
        tokens = shape[0]
    elif positions.dim() == 2 and shape[0] == 3:
        tokens = shape[1]
    else:
        raise ValueError(
            f"positions: expected [3, T] (time, height, width) or [T] (text only) for mRoPE, "
            f"got shape {shape}"
        )
    if tokens > 1 and positions.stride(-1) != 1:
        raise ValueError(
            f"positions: expected a contiguous last dimension, got shape {shape} with strides "
            f"{positions.stride()}"
        )
    return tokens


def check_spec_args(
    spec: RopeSpec,
    device: torch.device,
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    cos_sin_cache: torch.Tensor,
) -> None:
    """:func:`check_rope_args`, then that the call is of ``spec`` on ``device``.

    Raises:
        TypeError, ValueError: the message names the argument, the expected and the actual.
    """
    # The query's device first: check_rope_args compares the others with the query's.
    if isinstance(query, torch.Tensor) and query.device != device:
        raise ValueError(f"query: expected device {device}, got {query.device}")
    actual, _, _ = check_rope_args(
        positions, query, key, cos_sin_cache, spec.head_size, spec.is_neox, expected=spec
    )
    if actual.rotary_dim != spec.rotary_dim:
        raise ValueError(
            f"cos_sin_cache: expected width rotary_dim={spec.rotary_dim}, got {actual.rotary_dim}"
        )


def check_positions_in_cache(positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    """Every position indexes a row of the cache (reads the positions: a sync on CUDA).

    Raises:
        ValueError: a position is negative or not below ``cos_sin_cache.shape[0]``.
    """
    if positions.numel() == 0:
        return
    low, high = (int(v) for v in torch.aminmax(positions))
    rows = cos_sin_cache.shape[0]
    if low < 0 or high >= rows:
        raise ValueError(
            f"positions: expected values in [0, {rows}) (the cos_sin_cache rows), got values "
            f"from {low} to {high}"
        )


# fn(positions, query, key, cos_sin_cache) -> num_tokens; raises TypeError/ValueError.
CallCheck = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", torch.Tensor], int]


def call_checker(spec: RopeSpec, device: torch.device, *, debug: bool = False) -> CallCheck:
    """The per-call check of a selector for ``spec`` on ``device``; returns the token count.

    Everything it compares is computed here, once: the common call (positions ``[T]`` or
    ``[B, S]``, query and key ``[T, H*D]``, possibly column slices of a fused qkv tensor, the
    cos/sin cache passed last time) costs a few integer and identity compares. Any other call
    goes through :func:`check_spec_args`, which accepts every layout of the contract and names
    the faulty argument. With ``debug``, positions are also checked against the cache rows
    (:func:`check_positions_in_cache`, a device sync per call).

    Raises (from the returned function):
        TypeError, ValueError: the message names the argument.
    """
    dtype, rotary_dim = spec.dtype, spec.rotary_dim
    q_width, k_width = spec.num_heads * spec.head_size, spec.num_kv_heads * spec.head_size
    # get_device(): the CUDA index, -1 for every other device type (CPU and meta alike), so a
    # CPU selector also asks is_cpu; a selector on any other device always takes the full check.
    on_cpu = device.type == "cpu"
    device_index = device.index if device.type == "cuda" else -1 if on_cpu else None
    position_dtypes = _POSITION_DTYPES
    cache_dtypes = (torch.float32, dtype)
    # The last cos/sin cache that passed: a serving stack passes the same one on every call.
    passed_cache: list[torch.Tensor | None] = [None]

    def cache_ok(cache: torch.Tensor) -> bool:
        if (
            cache.dtype in cache_dtypes
            and cache.get_device() == device_index
            and (not on_cpu or cache.is_cpu)
            and cache.dim() == 2
            and cache.shape[1] == rotary_dim
            and cache.stride(1) == 1
        ):
            passed_cache[0] = cache
            return True
        return False

    def check(positions, query, key, cos_sin_cache) -> int:
        try:
            num_tokens = positions.numel()
            if (
                query.dtype is dtype
                and query.get_device() == device_index
                and query.shape == (num_tokens, q_width)
                and query.stride()[1] == 1
                and positions.dtype in position_dtypes
                and positions.get_device() == device_index
                and positions.is_contiguous()
                and (
                    key is None
                    or (
                        key.dtype is dtype
                        and key.get_device() == device_index
                        and key.shape == (num_tokens, k_width)
                        and key.stride()[1] == 1
                    )
                )
                and (cos_sin_cache is passed_cache[0] or cache_ok(cos_sin_cache))
                and (
                    not on_cpu
                    or (query.is_cpu and positions.is_cpu and (key is None or key.is_cpu))
                )
            ):
                return num_tokens
        except AttributeError:  # not a tensor: the full check names it
            pass
        check_spec_args(spec, device, positions, query, key, cos_sin_cache)
        return positions.numel()

    if spec.is_mrope:
        check = _mrope_checker(spec, device, cache_ok, passed_cache)
    if not debug:
        return check

    def check_debug(positions, query, key, cos_sin_cache) -> int:
        num_tokens = check(positions, query, key, cos_sin_cache)
        check_positions_in_cache(positions, cos_sin_cache)
        return num_tokens

    return check_debug


def _mrope_checker(
    spec: RopeSpec,
    device: torch.device,
    cache_ok: Callable[[torch.Tensor], bool],
    passed_cache: list,
) -> CallCheck:
    """:func:`call_checker`'s per-call check for a multimodal spec: positions ``[3, T]`` (a
    slice of a longer buffer too) or ``[T]``; the token count is their last dimension. Shares
    the plain check's memo of the last cache that passed (``cache_ok``, ``passed_cache``)."""
    dtype = spec.dtype
    q_width, k_width = spec.num_heads * spec.head_size, spec.num_kv_heads * spec.head_size
    on_cpu = device.type == "cpu"
    device_index = device.index if device.type == "cuda" else -1 if on_cpu else None

    def check(positions, query, key, cos_sin_cache) -> int:
        try:
            num_tokens = positions.shape[-1]
            if (
                positions.dtype in _POSITION_DTYPES
                and (positions.dim() == 1 or (positions.dim() == 2 and positions.shape[0] == 3))
                and (num_tokens <= 1 or positions.stride(-1) == 1)
                and positions.get_device() == device_index
                and query.dtype is dtype
                and query.get_device() == device_index
                and query.shape == (num_tokens, q_width)
                and query.stride()[1] == 1
                and (
                    key is None
                    or (
                        key.dtype is dtype
                        and key.get_device() == device_index
                        and key.shape == (num_tokens, k_width)
                        and key.stride()[1] == 1
                    )
                )
                and (cos_sin_cache is passed_cache[0] or cache_ok(cos_sin_cache))
                and (
                    not on_cpu
                    or (query.is_cpu and positions.is_cpu and (key is None or key.is_cpu))
                )
            ):
                return num_tokens
        except (AttributeError, IndexError):  # not a tensor, or 0-d positions: the full check
            pass
        check_spec_args(spec, device, positions, query, key, cos_sin_cache)
        return positions.shape[-1]

    return check
