"""vLLM's multimodal RoPE (``MRotaryEmbedding``) as the plugin needs it: whether the installed
``forward_native`` is the mRoPE a :class:`kernels.RopeSpec` names (probed once against the
float64 reference), whether a layer's sections are a layout the spec names, and that
``forward_native``'s math as an in-place callable for specs ``select_rope`` refuses.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from kernels import RopeSpec

__all__ = ["MropeLayerView", "mrope_layout_reason", "mrope_native_reason", "native_mrope_op"]


@functools.cache
def _apply_rotary_emb(is_neox: bool) -> type:
    """The layer's ``apply_rotary_emb`` as ``forward_native`` uses it, built as the layer builds
    its ``ApplyRotaryEmb``: the style given, enable_fp32_compute off (once per style)."""
    from vllm.model_executor.layers.rotary_embedding.common import ApplyRotaryEmb

    rotate = functools.partial(ApplyRotaryEmb.forward_static, is_neox_style=is_neox)
    return type("_Rotate", (), {"forward_native": staticmethod(rotate)})


class MropeLayerView:
    """What ``MRotaryEmbedding.forward_native`` reads of its layer, without building one (that
    needs a current vLLM config): to probe the installed ``forward_native`` at registration and
    to run its math for a spec ``select_rope`` refuses."""

    def __init__(self, head_size, rotary_dim, is_neox, section, interleaved, cos_sin_cache):
        self.head_size, self.rotary_dim, self.is_neox_style = head_size, rotary_dim, is_neox
        self.mrope_section, self.mrope_interleaved = list(section), interleaved
        self.cos_sin_cache = cos_sin_cache
        self.apply_rotary_emb = _apply_rotary_emb(is_neox)

    def _match_cos_sin_cache_dtype(self, query: torch.Tensor) -> torch.Tensor:
        return self.cos_sin_cache.to(query.device, dtype=query.dtype)


def native_mrope_op(
    head_size: int, rotary_dim: int, is_neox: bool, section: tuple, interleaved: bool
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor], None]:
    """vLLM's ``MRotaryEmbedding.forward_native`` math, written back into ``query``/``key``."""
    from vllm.model_executor.layers.rotary_embedding import MRotaryEmbedding

    def run(positions, query, key, cos_sin_cache):
        layer = MropeLayerView(head_size, rotary_dim, is_neox, section, interleaved, cos_sin_cache)
        # forward_native needs a key; it is out of place, so the query stands in for a missing one.
        out_q, out_k = MRotaryEmbedding.forward_native(
            layer, positions, query, query if key is None else key
        )
        query.copy_(out_q.view(query.shape))
        if key is not None:
            key.copy_(out_k.view(key.shape))

    return run


# (head_size, rotary_dim, section, interleaved, is_neox, text only): both section layouts, both
# styles, partial rotary, [T] positions; sections distinct enough that a swapped stream shows.
_MROPE_PROBES = (
    (16, 16, (2, 3, 3), False, True, False),
    (16, 16, (4, 2, 2), True, False, False),
    (16, 8, (2, 1, 1), True, True, False),
    (16, 16, (3, 2, 3), False, False, True),
)


@functools.cache
def mrope_native_reason(forward_native: Callable) -> str | None:
    """Why the installed ``MRotaryEmbedding.forward_native`` is not the mRoPE a
    :class:`kernels.RopeSpec` with its sections names (probed on small float32 inputs against
    :func:`kernels.testing.rope_reference`), or None."""
    from kernels.testing import assert_rope_close, rope_reference

    gen = torch.Generator().manual_seed(0)
    for head_size, rotary_dim, section, interleaved, is_neox, text_only in _MROPE_PROBES:
        cache = torch.randn(32, rotary_dim, generator=gen)
        positions = torch.randint(0, 32, (5,) if text_only else (3, 5), generator=gen)
        query = torch.randn(5, 2 * head_size, generator=gen)
        key = torch.randn(5, head_size, generator=gen)
        layer = MropeLayerView(head_size, rotary_dim, is_neox, section, interleaved, cache)
        try:
            got_q, got_k = forward_native(layer, positions, query.clone(), key.clone())
            want_q, want_k = rope_reference(
                positions, query, key, cache, head_size, is_neox,
                mrope_section=section, mrope_interleaved=interleaved,
            )  # fmt: skip
            assert_rope_close(got_q, want_q, torch.float32, "query")
            assert_rope_close(got_k, want_k, torch.float32, "key")
        except AssertionError as exc:
            return (
                f"has a forward_native that is not the mRoPE of mrope_section={list(section)} "
                f"interleaved={interleaved} {'text-only ' if text_only else ''}"
                f"{'neox' if is_neox else 'gptj'} ({exc})"
            )
        except Exception as exc:  # a vLLM whose layer reads other attributes
            return f"has a forward_native this module cannot probe ({type(exc).__name__}: {exc})"
    return None


def mrope_layout_reason(layer: torch.nn.Module) -> str | None:
    """Why ``layer``'s sections are not a layout :class:`kernels.RopeSpec` names, or None."""
    section = getattr(layer, "mrope_section", None)
    if not section:
        return "it has no mrope_section"
    try:
        RopeSpec(
            layer.head_size, layer.rotary_dim, 1, 1, layer.is_neox_style, torch.float32,
            mrope_section=tuple(section), mrope_interleaved=bool(layer.mrope_interleaved),
        )  # fmt: skip
    except ValueError as exc:
        return str(exc)
    return None
