"""``flashinfer``: FlashInfer's ``apply_rope_with_cos_sin_cache_inplace``."""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field
from types import ModuleType

import torch

from .._cast_once import CastOnce
from .._spec import RopeSpec
from ._base import Config, Provider, RopeFn, cuda_only_reason, register_provider
from ._torch import as_token_head_view

__all__ = ["FlashInferProvider"]


# Head sizes FlashInfer's kernels are instantiated for; others compute garbage (seen: head 80).
_HEAD_SIZES = (64, 128, 256, 512)


@functools.cache
def _flashinfer_rope() -> ModuleType | str:
    """FlashInfer's rope module, or why it cannot be imported (imported on first use only)."""
    try:
        return importlib.import_module("flashinfer.rope")
    except Exception as exc:  # ImportError, or a broken install raising anything at import
        return f"flashinfer is not importable ({type(exc).__name__}: {exc})"


@dataclass(frozen=True)
class FlashInferProvider(Provider):
    name: str = "flashinfer"
    description: str = "FlashInfer's apply_rope_with_cos_sin_cache_inplace (fp16/bf16, key needed)"
    # FlashInfer reads a float32 cache only; other caches are converted once each.
    _to_float32: CastOnce = field(
        default_factory=lambda: CastOnce(torch.float32), init=False, repr=False, compare=False
    )

    def unavailable_reason(self, device: torch.device | str) -> str | None:
        module = cuda_only_reason(device) or _flashinfer_rope()
        return module if isinstance(module, str) else None

    def unsupported_reason(self, spec: RopeSpec, *, has_key: bool = True) -> str | None:
        layout = super().unsupported_reason(spec, has_key=has_key)
        if layout is not None:
            return layout
        if spec.dtype not in (torch.float16, torch.bfloat16):
            return f"takes float16 or bfloat16 q/k, not {spec.dtype_name}"
        if not has_key:
            return "needs a key tensor"
        if spec.head_size not in _HEAD_SIZES:
            return f"takes head sizes {_HEAD_SIZES}, not {spec.head_size}"
        if spec.rotary_dim % 16:
            # Its kernel moves 8-element vectors; NeoX's second half must start on one.
            return f"takes rotary_dim a multiple of 16, not {spec.rotary_dim}"
        return None

    def build(self, spec: RopeSpec, config: Config) -> RopeFn:
        rope = _flashinfer_rope()
        if isinstance(rope, str):
            raise RuntimeError(f"flashinfer: {rope}")
        apply_inplace = rope.apply_rope_with_cos_sin_cache_inplace
        head_size, is_neox, to_float32 = spec.head_size, spec.is_neox, self._to_float32

        def run(positions, query, key, cos_sin_cache):
            n = positions.numel()
            # Tokens as tokens: [B, S, ...] inputs are read as [B*S, H, D] views.
            q = as_token_head_view("query", query, head_size, n)
            k = as_token_head_view("key", key, head_size, n)
            apply_inplace(
                positions.reshape(-1), q, k, head_size, to_float32(cos_sin_cache), is_neox=is_neox
            )

        return run


register_provider(FlashInferProvider())
