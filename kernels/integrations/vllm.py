"""vLLM plugin: vLLM's RoPE layers run the kernel :func:`kernels.select_rope` picks.

Installed as the entry point ``rope_autotune`` in the group ``vllm.general_plugins``; vLLM calls
:func:`register` in every process it starts (all plugins by default, or only those named in
``VLLM_PLUGINS``). :func:`register` overrides, with ``CustomOp.register_oot``, each class in
:data:`COVERED_CLASSES` that the installed vLLM has and whose paths are still the ones this
module bridges, checked per class:

- :data:`BASE_OP_CLASSES`: the CUDA path is the base rotary op on the layer's own
  ``[max_position, rotary_dim]`` cache (its ``forward_cuda``, ``forward_native`` and cache
  conversion are ``RotaryEmbedding``'s own).
- :data:`MROPE_CLASSES`: multimodal RoPE (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), positions ``[3, T]``
  (or ``[T]``, text only) on the layer's own cache, its sections chunked or interleaved
  (``mrope_section``, ``mrope_interleaved``), with or without YaRN scaling (folded into the
  cache). Its methods are ``MRotaryEmbedding``'s own, and its ``forward_native`` is probed on
  small inputs against :func:`kernels.testing.rope_reference` for both section layouts, both
  styles, partial rotary and text-only positions.

The override's ``forward_cuda`` converts the layer's cache exactly as vLLM's does
(``_match_cos_sin_cache_dtype``: to the query's dtype and device, kept on the layer), then rotates
``query`` and ``key`` (or only ``query`` when ``key`` is None) in place with the selector for
the call's spec, and returns ``(query, key)``. Selectors are built on first use, one per spec
(head size, rotary dim, heads read from the tensors, style, dtype, device, mRoPE sections) and
shared by every layer with that spec (:mod:`._vllm_calls`). With ``ROPE_AUTOTUNE_TUNE=first-use``
in the environment, a spec the tables lack is tuned then, in vLLM's warm-up run, and persisted
for the next start (:mod:`kernels.first_use`). Inside ``torch.compile`` the call is one opaque
op, ``torch.ops.rope_autotune.vllm_rotary_embedding`` (``vllm_mrotary_embedding`` for mRoPE),
with a fake implementation, so the graph does not break. A spec ``select_rope`` refuses runs
vLLM's own math: its rotary op, or for mRoPE its ``forward_native`` (its Triton mRoPE kernel
rotates NeoX halves only). An mRoPE layer whose section layout :class:`kernels.RopeSpec` does
not name (an interleaved layout whose time section is not the largest) keeps vLLM's
``forward_cuda``.

The overrides keep the in-tree ``name`` (``rotary_embedding``), so vLLM's switch
``custom_ops=["+rotary_embedding"]`` / ``["-rotary_embedding"]`` turns them on and off as it
does vLLM's own op; with :data:`ON_BY_DEFAULT` they are also on where vLLM would leave the op
off by default (``custom_ops`` ``"none"``, its default when Inductor compiles the model), so
the compiled graph holds our op instead of Inductor's compile of ``forward_native``; one log
line per class and decision says which and why. vLLM's fusion passes (:data:`FUSION_PASSES`:
QK-norm+RoPE, RoPE+KV-cache) match vLLM's own rotary op in the compiled graph and would not find
ours, so a base-op layer built while one of them is on keeps vLLM's op (one warning); none of
them matches mRoPE.
"""

import logging
import threading

import torch

from kernels import RopeSelector
from kernels.devices import normalize_device
from kernels.integrations._vllm_calls import rope_for, rotary_embedding
from kernels.integrations._vllm_mrope import mrope_layout_reason, mrope_native_reason

__all__ = [
    "BASE_OP_CLASSES",
    "COVERED_CLASSES",
    "FUSION_PASSES",
    "MROPE_CLASSES",
    "ON_BY_DEFAULT",
    "register",
    "registered_overrides",
    "selector_for",
    "unregister",
]

# "vllm." so that vLLM's logging configuration shows these lines.
logger = logging.getLogger("vllm.rope_autotune")

# vLLM 0.26.0's RoPE classes whose forward_cuda is RotaryEmbedding.forward_cuda: the base rotary
# op on the layer's own cos/sin cache. They differ only in how the cache is computed.
BASE_OP_CLASSES: tuple[str, ...] = (
    "RotaryEmbedding",
    "LinearScalingRotaryEmbedding",  # several caches stacked; positions carry the offset
    "NTKScalingRotaryEmbedding",
    "DynamicNTKScalingRotaryEmbedding",
    "DynamicNTKAlphaRotaryEmbedding",
    "Llama3RotaryEmbedding",
    "YaRNScalingRotaryEmbedding",  # the magnitude scale is folded into the cache
    "TeleChat3RoPEScaledRotaryEmbedding",  # a YaRN variant
    "Gemma4RotaryEmbedding",  # rotary_dim = head_size, zero frequencies past the rotated part
)
# vLLM 0.26.0's multimodal RoPE class (chunked or interleaved sections; its YaRN scaling is a
# constructor option, folded into the cache). Its subclasses are left to vLLM: Ernie-4.5-VL's
# alternates height and width frequencies before the time ones, a layout RopeSpec does not name,
# and MRotaryEmbeddingInterleaved (openPangu) overrides forward itself (never reaching
# forward_cuda) with a generated order that is not Qwen3-VL's. XDRotaryEmbedding rotates with
# four position streams.
MROPE_CLASSES: tuple[str, ...] = ("MRotaryEmbedding",)
COVERED_CLASSES: tuple[str, ...] = BASE_OP_CLASSES + MROPE_CLASSES

_is_compiling = torch.compiler.is_compiling

_REGISTER_LOCK = threading.Lock()
_OVERRIDES: dict[str, type] = {}  # in-tree class name -> our override class


# The ops a covered layer's forward_cuda calls while torch.compile traces it: one opaque op
# per call in the graph, with a fake implementation, so the graph does not break.
@torch.library.custom_op("rope_autotune::vllm_rotary_embedding", mutates_args=("query", "key"))
def _rotary_embedding_op(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> None:
    """In-place RoPE with vLLM's rotary op's signature, through the selector for the call."""
    rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox)
    return None


@_rotary_embedding_op.register_fake
def _rotary_embedding_fake(positions, query, key, head_size, cos_sin_cache, is_neox) -> None:
    return None  # in place: shapes and strides unchanged


@torch.library.custom_op("rope_autotune::vllm_mrotary_embedding", mutates_args=("query", "key"))
def _mrotary_embedding_op(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
    mrope_section: list[int],
    mrope_interleaved: bool,
) -> None:
    """In-place multimodal RoPE (positions ``[3, T]`` or ``[T]``) through the selector for the
    call, with the layer's sections."""
    rotary_embedding(
        positions, query, key, head_size, cos_sin_cache, is_neox,
        tuple(mrope_section), mrope_interleaved,
    )  # fmt: skip
    return None


@_mrotary_embedding_op.register_fake
def _mrotary_embedding_fake(
    positions, query, key, head_size, cos_sin_cache, is_neox, mrope_section, mrope_interleaved
) -> None:
    return None  # in place: shapes and strides unchanged


# vLLM's compile passes that fuse its own rotary op with neighbours; they match
# torch.ops._C.rotary_embedding, so a layer built while one is on keeps vLLM's op.
FUSION_PASSES: tuple[str, ...] = (
    "enable_qk_norm_rope_fusion",
    "fuse_rope_kvcache",
    "fuse_qk_norm_rope_kvcache",
)


# Whether covered layers run select_rope where vLLM leaves its rotary custom op off by default
# (``custom_ops`` "none"). On: in compiled attention blocks (benchmarks/vllm_block.py) the op
# was no slower than Inductor's compile of forward_native beyond the run-to-run spread, and
# faster where RoPE's share shows (docs/DESIGN.md#on-by-default-in-vllm).
ON_BY_DEFAULT = True
_LOGGED: set[tuple[str, bool]] = set()  # (class, on) decisions logged once


class _Override:
    """What the overrides share: the custom op's switch (vLLM's, except that with
    :data:`ON_BY_DEFAULT` the op is on unless ``custom_ops`` has ``-rotary_embedding``), and
    eager calls through the selector of the layer's one spec.

    While a layer's eager calls all have one spec, it calls that spec's selector directly: the
    selector checks every call against its spec (heads, dtype, device, rotary dim) and raises
    before writing anything when the call does not fit. From the first call that does not (vLLM
    shares a layer between attention layers with the same rotary parameters, whatever their
    heads), each call's spec is looked up.
    """

    _selector: RopeSelector | None = None
    _specs_vary = False

    @classmethod
    def enabled(cls) -> bool:
        from vllm.config import get_cached_compilation_config

        if super().enabled():
            on, why = True, "vLLM's custom_ops turn it on"
        elif f"-{cls.name}" in get_cached_compilation_config().custom_ops:
            on, why = False, f"custom_ops has -{cls.name}"
        else:
            on = ON_BY_DEFAULT
            why = "rope-autotune turns it on by default" if on else "vLLM's default leaves it off"
        if (cls.__name__, on) not in _LOGGED:
            _LOGGED.add((cls.__name__, on))
            logger.info(
                "rope-autotune: custom op %r %s for %s: %s",
                cls.name,
                "on" if on else "off",
                cls.__name__.removeprefix("RopeAutotune"),
                why,
            )
        return on

    def _rotate(
        self,
        positions: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor | None,
        cos_sin_cache: torch.Tensor,
        mrope_section: tuple[int, ...] | None = None,
        mrope_interleaved: bool = False,
    ) -> None:
        selector = self._selector
        if selector is not None:
            try:
                selector(positions, query, key, cos_sin_cache)
                return
            except (TypeError, ValueError):  # another spec (a bad call raises again below)
                self._selector, self._specs_vary = None, True
        fn = rotary_embedding(
            positions, query, key, self.head_size, cos_sin_cache, self.is_neox_style,
            mrope_section, mrope_interleaved,
        )  # fmt: skip
        if not self._specs_vary and isinstance(fn, RopeSelector):
            self._selector = fn


class _SelectedRope(_Override):
    """Mixed in front of a covered vLLM class: its CUDA path goes through ``select_rope``."""

    def dispatch_forward(self, *args, **kwargs):
        forward = super().dispatch_forward(*args, **kwargs)
        if getattr(forward, "__func__", None) is not _SelectedRope.forward_cuda:
            return forward  # custom op off (forward_native) or another platform's path
        from vllm.config import get_cached_compilation_config

        pass_config = get_cached_compilation_config().pass_config
        fusing = [name for name in FUSION_PASSES if getattr(pass_config, name, False)]
        if fusing:
            logger.warning(
                "rope-autotune: %s keeps vLLM's rotary op: the fusion pass %s matches it",
                type(self).__name__,
                ", ".join(fusing),
            )
            return super().forward_cuda  # the in-tree class's own CUDA path
        return forward

    def forward_cuda(
        self,
        positions: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # vLLM's conversion: the cache in the query's dtype and device, stored on the layer.
        cos_sin_cache = self._match_cos_sin_cache_dtype(query)
        if _is_compiling():
            torch.ops.rope_autotune.vllm_rotary_embedding(
                positions, query, key, self.head_size, cos_sin_cache, self.is_neox_style
            )
            return query, key
        self._rotate(positions, query, key, cos_sin_cache)
        return query, key


class _SelectedMrope(_Override):
    """Mixed in front of ``MRotaryEmbedding``: its CUDA path goes through ``select_rope`` with
    the layer's sections, for positions ``[3, T]`` and ``[T]`` alike (``offsets`` is ignored,
    as vLLM's layer ignores it). A layer whose section layout :class:`kernels.RopeSpec` does not
    name keeps vLLM's ``forward_cuda`` (one warning).
    """

    _layout_refused: str | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)  # dispatch_forward runs before the sections are set
        reason = mrope_layout_reason(self)
        if reason is None:
            return
        self._layout_refused = reason
        if getattr(self._forward_method, "__func__", None) is _SelectedMrope.forward_cuda:
            self._forward_method = super().forward_cuda  # the in-tree class's own CUDA path
            logger.warning(
                "rope-autotune: %s(mrope_section=%s, mrope_interleaved=%s) keeps vLLM's path: %s",
                type(self).__name__.removeprefix("RopeAutotune"),
                getattr(self, "mrope_section", None),
                getattr(self, "mrope_interleaved", None),
                reason,
            )

    def forward_cuda(
        self,
        positions: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        offsets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._layout_refused is not None:
            return super().forward_cuda(positions, query, key, offsets)
        # vLLM's conversion: the cache in the query's dtype and device, stored on the layer.
        cos_sin_cache = self._match_cos_sin_cache_dtype(query)
        if _is_compiling():
            torch.ops.rope_autotune.vllm_mrotary_embedding(
                positions, query, key, self.head_size, cos_sin_cache, self.is_neox_style,
                list(self.mrope_section), bool(self.mrope_interleaved),
            )  # fmt: skip
            return query, key
        self._rotate(
            positions, query, key, cos_sin_cache,
            tuple(self.mrope_section), bool(self.mrope_interleaved),
        )  # fmt: skip
        return query, key


def _base_path_reason(cls: type, base: type) -> str | None:
    """Why ``cls`` does not run ``base``'s rotary op on its own cache, or None when it does."""
    if not issubclass(cls, base):
        return f"is not a subclass of {base.__name__}"
    for method in ("forward_cuda", "forward_native", "forward", "_match_cos_sin_cache_dtype"):
        if getattr(cls, method) is not getattr(base, method):
            return f"overrides {method}"
    return None


def _mrope_path_reason(cls: type, base: type) -> str | None:
    """Why ``cls`` does not run ``base``'s (vLLM's ``MRotaryEmbedding``'s) multimodal RoPE on
    its own cache as a :class:`kernels.RopeSpec` with its sections names it, or None."""
    reason = _base_path_reason(cls, base)
    return reason if reason is not None else mrope_native_reason(base.forward_native)


def register() -> None:
    """Override vLLM's covered RoPE classes (the plugin's entry point; safe to call again).

    Classes missing from the installed vLLM, or whose CUDA path is no longer the base op, are
    left to vLLM, with one log line each.
    """
    from vllm.model_executor.custom_op import CustomOp, op_registry_oot
    from vllm.model_executor.layers import rotary_embedding as rope_module

    base = rope_module.RotaryEmbedding
    with _REGISTER_LOCK:
        for name in COVERED_CLASSES:
            if name in _OVERRIDES and op_registry_oot.get(name) is _OVERRIDES[name]:
                continue
            cls = getattr(rope_module, name, None)
            if cls is None:
                logger.info("rope-autotune: this vLLM has no %s; nothing to override", name)
                continue
            if name in MROPE_CLASSES:
                mixin = _SelectedMrope
                reason = _mrope_path_reason(cls, rope_module.MRotaryEmbedding)
            else:
                mixin = _SelectedRope
                reason = _base_path_reason(cls, base)
            if reason is not None:
                logger.warning("rope-autotune: leaving %s to vLLM: it %s", name, reason)
                continue
            if name in op_registry_oot:
                logger.warning(
                    "rope-autotune: leaving %s to %s, registered out of tree already",
                    name,
                    op_registry_oot[name].__qualname__,
                )
                continue
            override = type(f"RopeAutotune{name}", (mixin, cls), {"__module__": __name__})
            CustomOp.register_oot(override, name=name)
            # register_oot renames the op to the class name; keep the switch users know.
            override.name = cls.name
            _OVERRIDES[name] = override
        logger.info(
            "rope-autotune: vLLM RoPE layers %s run select_rope when the custom op %r is on (%s)",
            ", ".join(sorted(_OVERRIDES)),
            base.name,
            f"on unless custom_ops has -{base.name}" if ON_BY_DEFAULT else "vLLM's default",
        )


def unregister() -> None:
    """Undo :func:`register`: layers built afterwards are vLLM's own again."""
    from vllm.model_executor.custom_op import op_registry_oot

    with _REGISTER_LOCK:
        for name, override in list(_OVERRIDES.items()):
            if op_registry_oot.get(name) is override:
                del op_registry_oot[name]
            del _OVERRIDES[name]


def registered_overrides() -> dict[str, type]:
    """In-tree class name -> override class, for the classes :func:`register` overrode."""
    return dict(_OVERRIDES)


def selector_for(
    layer: torch.nn.Module,
    num_heads: int,
    num_kv_heads: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> RopeSelector | None:
    """The selector an overridden ``layer`` uses for calls with these heads (built if needed),
    or None when it runs vLLM's own op; ``print(selector.explain(num_tokens))`` says why.

    ``dtype`` and ``device`` default to the layer's cache's; ``num_kv_heads`` to ``num_heads``.
    An mRoPE layer's selector has the layer's sections.
    """
    if isinstance(layer, _SelectedMrope):
        if layer._layout_refused is not None:
            return None
        section, interleaved = tuple(layer.mrope_section), bool(layer.mrope_interleaved)
    else:
        section, interleaved = None, False
    cache = layer.cos_sin_cache
    device = normalize_device(device if device is not None else cache.device)
    fn = rope_for(
        layer.head_size,
        cache.shape[-1],
        num_heads,
        num_kv_heads if num_kv_heads is not None else num_heads,
        layer.is_neox_style,
        dtype if dtype is not None else layer.dtype,
        device,
        section,
        interleaved,
    )
    return fn if isinstance(fn, RopeSelector) else None
