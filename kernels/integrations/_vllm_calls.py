"""The rope callables vLLM's layers call through the plugin, one per call signature.

A call's signature is what picks its kernel: head size, rotary dim, the heads read from the
tensors, style, dtype, device and, for mRoPE, the sections. Its callable is built on first use
and shared by every layer with that signature: the selector :func:`kernels.select_rope` returns,
or vLLM's own math where ``select_rope`` refuses the spec (its rotary op, or for mRoPE its
``forward_native``). :func:`rotary_embedding` is the body of the plugin's custom ops too.
"""

import logging
import threading
from collections.abc import Callable

import torch

from kernels import select_rope
from kernels.integrations._vllm_mrope import native_mrope_op

__all__ = ["RopeCall", "rope_for", "rotary_embedding"]

# "vllm." so that vLLM's logging configuration shows these lines.
logger = logging.getLogger("vllm.rope_autotune")

RopeCall = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", torch.Tensor], None]

# (head_size, rotary_dim, num_heads, num_kv_heads, is_neox, dtype, device, mrope_section,
#  mrope_interleaved) -> rope callable; mrope_section is None for plain RoPE.
_ROPES: dict[tuple, RopeCall] = {}
_BUILD_LOCK = threading.Lock()


def _num_heads(x: torch.Tensor, token_dims: int, head_size: int) -> int:
    # [T, H, D] / [B, S, H, D] give heads a dimension; [T, H*D] / [B, S, H*D] pack them.
    return x.shape[-2] if x.dim() - token_dims == 2 else x.shape[-1] // head_size


def _build(sig: tuple) -> RopeCall:
    """The rope callable for ``sig``: a selector, or vLLM's own math when none can be built."""
    with _BUILD_LOCK:
        fn = _ROPES.get(sig)
        if fn is not None:
            return fn
        head_size, rotary_dim, num_heads, num_kv_heads, is_neox, dtype, device = sig[:7]
        section, interleaved = sig[7:]
        try:
            selector = select_rope(
                head_size, rotary_dim, num_heads, num_kv_heads, is_neox, dtype, device,
                mrope_section=section, mrope_interleaved=interleaved,
            )  # fmt: skip
        except (ValueError, TypeError, RuntimeError) as exc:
            logger.warning(
                "rope-autotune: cannot select a RoPE kernel for head_size=%d rotary_dim=%d "
                "heads=%d/%d %s%s on %s (%s); this shape runs vLLM's own %s",
                head_size,
                rotary_dim,
                num_heads,
                num_kv_heads,
                dtype,
                "" if section is None else f" mrope_section={list(section)}",
                device,
                exc,
                "op" if section is None else "forward_native",
            )
            if section is None:
                fn = _vllm_op(head_size, is_neox)
            else:
                fn = native_mrope_op(head_size, rotary_dim, is_neox, section, interleaved)
        else:
            logger.info(
                "rope-autotune: vLLM RoPE %s on %s runs %s; 1 token: %s",
                selector.spec.key,
                device,
                selector,
                selector.explain(1),
            )
            fn = selector
        _ROPES[sig] = fn
        return fn


def _vllm_op(head_size: int, is_neox: bool) -> RopeCall:
    from vllm import _custom_ops as ops

    def run(positions, query, key, cos_sin_cache):
        ops.rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox)

    return run


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
    mrope_section: tuple[int, ...] | None = None,
    mrope_interleaved: bool = False,
) -> RopeCall:
    """Rotate in place with the rope callable for the call's signature; returns that callable."""
    # mRoPE positions are [3, T] or [T]; its query and key have one token dimension either way.
    token_dims = positions.dim() if mrope_section is None else 1
    num_heads = _num_heads(query, token_dims, head_size)
    num_kv_heads = num_heads if key is None else _num_heads(key, token_dims, head_size)
    fn = rope_for(
        head_size, cos_sin_cache.shape[-1], num_heads, num_kv_heads, is_neox, query.dtype,
        query.device, mrope_section, mrope_interleaved,
    )  # fmt: skip
    fn(positions, query, key, cos_sin_cache)
    return fn


def rope_for(
    head_size: int,
    rotary_dim: int,
    num_heads: int,
    num_kv_heads: int,
    is_neox: bool,
    dtype: torch.dtype,
    device: torch.device,
    mrope_section: tuple[int, ...] | None = None,
    mrope_interleaved: bool = False,
) -> RopeCall:
    """The rope callable for a call signature, built if new (``mrope_section`` None: plain
    RoPE)."""
    sig = (head_size, rotary_dim, num_heads, num_kv_heads, is_neox, dtype, device,
           mrope_section, mrope_interleaved)  # fmt: skip
    return _ROPES.get(sig) or _build(sig)
