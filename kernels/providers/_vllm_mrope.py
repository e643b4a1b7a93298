"""``vllm_mrope``: vLLM's own multimodal RoPE path, as its ``MRotaryEmbedding.forward_cuda`` runs
it (vLLM 0.26): the cos/sin rows gathered into a ``[3, T, rotary_dim]`` tensor, then its Triton
kernel ``triton_mrope``; text-only ``[T]`` positions take its ``forward_native`` math.

Like the layer, it holds the cache in the query's dtype (converted once per cache tensor).
vLLM's kernel works on contiguous copies of strided q/k views and returns them; the in-place
contract then copies them back, a copy vLLM's layer (which returns new tensors) does not make.
Its Triton kernel rotates NeoX halves only, so GPT-J style is refused (vLLM issue 49290: it
gives wrong output), as are calls without a key (the layer asserts one).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .._cast_once import CastOnce
from .._spec import RopeSpec
from ._base import MROPE, Config, Provider, RopeFn, cuda_only_reason, register_provider
from ._torch import as_token_head_view

__all__ = ["VLLM_MROPE", "VllmMropeProvider", "load_vllm_mrope"]

# The provider's registry name.
VLLM_MROPE = "vllm_mrope"


@functools.cache
def load_vllm_mrope() -> tuple[Callable, Callable] | str:
    """vLLM's ``triton_mrope`` and ``ApplyRotaryEmb.forward_static`` (the math of its
    ``forward_native``), or why they cannot be had. Imports vLLM's rotary-embedding layers
    (and with them its config machinery), not its serving stack."""
    try:
        from vllm.model_executor.layers.rotary_embedding.common import ApplyRotaryEmb
        from vllm.model_executor.layers.rotary_embedding.mrope import triton_mrope
        from vllm.triton_utils import HAS_TRITON
    except Exception as exc:  # not installed, or a version whose layout moved
        return f"cannot import vLLM's mRoPE layer ({type(exc).__name__}: {exc})"
    if not HAS_TRITON:  # vLLM swapped in its placeholder module: its Triton kernels cannot run
        return "vLLM disabled its Triton kernels (vllm.triton_utils.HAS_TRITON is False)"
    return triton_mrope, ApplyRotaryEmb.forward_static


@dataclass(frozen=True)
class VllmMropeProvider(Provider):
    name: str = VLLM_MROPE
    description: str = (
        "vLLM's MRotaryEmbedding.forward_cuda path: gathered cos/sin, then its Triton kernel "
        "(NeoX only)"
    )
    layouts: tuple[str, ...] = (MROPE,)

    def unavailable_reason(self, device: torch.device | str) -> str | None:
        reason = cuda_only_reason(device)
        if reason is not None:
            return reason
        loaded = load_vllm_mrope()
        return loaded if isinstance(loaded, str) else None

    def unsupported_reason(self, spec: RopeSpec, *, has_key: bool = True) -> str | None:
        layout = super().unsupported_reason(spec, has_key=has_key)
        if layout is not None:
            return layout
        if not spec.is_neox:
            return (
                "vLLM's Triton mRoPE kernel rotates NeoX halves only: GPT-J style gives wrong "
                "output (vLLM issue 49290)"
            )
        if not has_key:
            return "vLLM's MRotaryEmbedding needs a key tensor"
        return None

    def build(self, spec: RopeSpec, config: Config) -> RopeFn:
        loaded = load_vllm_mrope()
        if isinstance(loaded, str):
            raise RuntimeError(f"{self.name}: {loaded}")
        triton_mrope, rotate = loaded
        head_size, rotary_dim, is_neox = spec.head_size, spec.rotary_dim, spec.is_neox
        section, interleaved = list(spec.mrope_section), spec.mrope_interleaved
        cast = CastOnce(spec.dtype)  # the layer keeps its cache in the query's dtype

        def run(positions, query, key, cos_sin_cache):
            n = positions.shape[-1]
            q = as_token_head_view("query", query, head_size, n)
            k = as_token_head_view("key", key, head_size, n)
            cos, sin = cast(cos_sin_cache)[positions].chunk(2, dim=-1)
            if positions.dim() == 2:
                # [T, H*D] views, as vLLM's layer hands them over (a copy would lose the write).
                q_flat, k_flat = q.flatten(1), k.flatten(1)
                if q_flat.data_ptr() != q.data_ptr() or k_flat.data_ptr() != k.data_ptr():
                    raise ValueError(f"query: {self.name} takes heads packed [T, H*D] rows")
                q_out, k_out = triton_mrope(
                    q_flat, k_flat, cos, sin, section, head_size, rotary_dim, interleaved
                )
                for flat, out in ((q_flat, q_out), (k_flat, k_out)):
                    if out.data_ptr() != flat.data_ptr():
                        flat.copy_(out)
                return
            for x in (q, k):  # text only: forward_native's math on the rotated slice
                rot = x[..., :rotary_dim]
                rot.copy_(rotate(rot, cos, sin, is_neox))

        return run


register_provider(VllmMropeProvider())
