"""transformers adapter: a loaded Hugging Face model applies its RoPE through ``select_rope``.

``patch = patch_model(model)`` makes every RoPE call of ``model`` run the kernel
:func:`kernels.select_rope` picks; ``patch.remove()`` (or :func:`unpatch_model`) undoes it.

transformers computes ``cos``/``sin`` once per forward (the model's ``*RotaryEmbedding`` module,
``[B, S, D]``, gathered at each token's position, the frequencies repeated over both halves) and
every attention layer calls its modeling module's ``apply_rotary_pos_emb(q, k, cos, sin)`` on
``[B, H, S, D]`` views, out of place. The bridge:

- A forward hook on each rotary module converts that forward's ``cos``/``sin`` once into our
  contract: a per-token cache ``[B*S, D]`` (cos half, then sin half) and positions ``[B, S]``
  indexing it (``0 .. B*S-1``; the rows repeat per sequence when ``cos`` is ``[1, S, D]``,
  broadcast over the batch). All layers share it; nothing is copied per layer.
- The modeling module's ``apply_rotary_pos_emb`` is replaced by a wrapper that recognises that
  forward's ``cos``/``sin`` (by identity), rotates ``q`` and ``k`` in place through their
  ``[B, S, H, D]`` views with the selector for their spec, and returns them. Any other call (a
  model not patched, autograd on, ``torch.compile`` tracing, a layout the selector refuses) runs
  the original function.

Supported: models whose modeling module's ``apply_rotary_pos_emb`` is Llama's NeoX rotation
(checked against the original on random inputs when patching) and whose rotary module returns
``cos``/``sin`` of shape ``[B, S, D]`` with equal halves (checked by a probe call). Partial rotary
is covered both ways: callers that pass the rotated slice of each head (Phi), and functions that
rotate the first ``cos.shape[-1]`` elements of a wider head (GPT-NeoX; checked as well). The
layers must use only the returned tensors, as transformers' attention code does: ``q`` and ``k``
change in place.

Multimodal RoPE (Qwen2-VL, Qwen2.5-VL, Qwen3-VL and its MoE variant, transformers 5): the text
model's rotary module takes positions ``[3, B, S]`` and merges the time, height and width streams
into one per-token ``cos``/``sin`` ``[B, S, D]`` (chunked or interleaved sections) before
``apply_rotary_pos_emb``, so the same bridge covers it: each token's merged row is its cache row.
A rotary module that returns per-stream ``cos``/``sin`` ``[3, B, S, D]`` for the attention layers
to merge (transformers 4's ``apply_multimodal_rotary_pos_emb``) is refused. The vision towers'
RoPE (``apply_rotary_pos_emb_vision``) stays transformers'.
"""

from __future__ import annotations

import inspect
import logging
import sys
import threading
import weakref
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from kernels import RopeSelector, select_rope

__all__ = ["RopePatch", "patch_model", "unpatch_model"]

logger = logging.getLogger(__name__)

_FUNCTION = "apply_rotary_pos_emb"
_ATTRIBUTE = "_rope_autotune_patch"
_is_compiling = torch.compiler.is_compiling
_LOCK = threading.Lock()


class _Forward:
    """One forward's ``cos``/``sin`` (kept to recognise them) and their conversion: ``cache``
    ``[Bc*S, D]`` and, per batch size of the layers' ``q``, positions ``[B, S]`` into it."""

    __slots__ = ("cache", "cos", "patch", "positions", "sin")

    def __init__(self, patch, cos, sin, cache):
        self.patch, self.cos, self.sin, self.cache = patch, cos, sin, cache
        self.positions: dict[int, torch.Tensor] = {}

    def positions_for(self, batch: int) -> torch.Tensor | None:
        positions = self.positions.get(batch)
        if positions is None:
            cos_batch, seq = self.cos.shape[:2]
            if cos_batch == batch:  # one cache row per token
                positions = self.patch.token_positions(batch * seq, self.cos.device)
            elif cos_batch == 1:  # cos [1, S, D] broadcast over the batch: rows repeat
                positions = self.patch.token_positions(seq, self.cos.device).repeat(batch)
            else:
                return None
            positions = positions.view(batch, seq)
            self.positions[batch] = positions
        return positions


class _ModulePatch:
    """The wrapper installed in one modeling module, shared by the models patched there."""

    def __init__(self, module: ModuleType, original: Callable, partial: bool) -> None:
        self.module, self.original, self.partial = module, original, partial
        self.forwards: dict[int, _Forward] = {}  # id(cos) -> the forward it came from
        self.users = 0
        self.wrapper = _make_wrapper(original, self.apply)

    def apply(self, q, k, cos, sin, unsqueeze_dim):
        """Rotate in place and return ``(q, k)``, or None for the original function to run."""
        forward = self.forwards.get(id(cos))
        if forward is None or forward.cos is not cos or forward.sin is not sin or _is_compiling():
            return None
        patch = forward.patch
        if unsqueeze_dim == 1:  # q, k: [B, H, S, D]
            q_view, k_view = q.transpose(1, 2), k.transpose(1, 2)
        elif unsqueeze_dim == 2:  # q, k: [B, S, H, D]
            q_view, k_view = q, k
        else:
            patch.fallbacks += 1
            return None
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            patch.fallbacks += 1
            return None
        positions = forward.positions_for(q_view.shape[0])
        rotary_dim = forward.cache.shape[-1]
        if positions is None or (q.shape[-1] != rotary_dim and not self.partial):
            rope = None
        else:
            rope = patch.rope_for(forward, positions, q_view, k_view)
        if rope is None:
            patch.fallbacks += 1
            return None
        rope(positions, q_view, k_view, forward.cache)
        patch.calls += 1
        return q, k


def _make_wrapper(original: Callable, apply: Callable) -> Callable:
    """A drop-in for ``original`` with its exact signature (two known forms)."""
    params = list(inspect.signature(original).parameters)
    if params == ["q", "k", "cos", "sin", "unsqueeze_dim"]:

        def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
            out = apply(q, k, cos, sin, unsqueeze_dim)
            return out if out is not None else original(q, k, cos, sin, unsqueeze_dim)

    elif params == ["q", "k", "cos", "sin", "position_ids", "unsqueeze_dim"]:  # transformers 4.x

        def apply_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
            out = apply(q, k, cos, sin, unsqueeze_dim)
            if out is not None:
                return out
            return original(q, k, cos, sin, position_ids, unsqueeze_dim)

    else:
        raise ValueError(
            f"model: its {_FUNCTION}{inspect.signature(original)} is not one this adapter knows"
        )
    apply_rotary_pos_emb.__wrapped__ = original
    apply_rotary_pos_emb.__doc__ = original.__doc__
    return apply_rotary_pos_emb


_MODULE_PATCHES: dict[str, _ModulePatch] = {}


class RopePatch:
    """What :func:`patch_model` did to one model; :meth:`remove` undoes it.

    Attributes:
        calls: RoPE calls this model ran through a selector.
        fallbacks: this model's RoPE calls that ran transformers' own function instead (autograd
            on, an unknown ``unsqueeze_dim``, or a layout the selector refused).
    """

    def __init__(self, model, module_patches, rotary_modules, options) -> None:
        self._model = weakref.ref(model)
        self._module_patches: list[_ModulePatch] = module_patches
        self._options = options
        self._selectors: dict[tuple, RopeSelector | None] = {}
        self._positions: dict[torch.device, torch.Tensor] = {}
        self._last: dict[int, int] = {}  # id(rotary module) -> id(cos) of its latest forward
        self.calls = 0
        self.fallbacks = 0
        self._hooks = [module.register_forward_hook(self._convert) for module in rotary_modules]
        self.rotary_modules = tuple(type(m).__name__ for m in rotary_modules)

    # -- per forward ---------------------------------------------------------------------------

    def _convert(self, module, args, output) -> None:
        """Forward hook of a rotary module: convert its ``cos``/``sin`` once for all layers."""
        if _is_compiling():
            return
        cos, sin = output
        previous = self._last.pop(id(module), None)
        for module_patch in self._module_patches:
            module_patch.forwards.pop(previous, None)
        if cos.dim() != 3 or sin.shape != cos.shape or cos.shape[-1] % 2:
            return
        batch, seq, width = cos.shape
        half = width // 2
        cache = torch.cat((cos[..., :half], sin[..., :half]), dim=-1).view(batch * seq, width)
        forward = _Forward(self, cos, sin, cache)
        for module_patch in self._module_patches:
            module_patch.forwards[id(cos)] = forward
        self._last[id(module)] = id(cos)

    def token_positions(self, count: int, device: torch.device) -> torch.Tensor:
        positions = self._positions.get(device)
        if positions is None or positions.numel() < count:
            positions = torch.arange(max(count, 4096), dtype=torch.int64, device=device)
            self._positions[device] = positions
        return positions[:count]

    def rope_for(self, forward: _Forward, positions, q: torch.Tensor, k: torch.Tensor):
        """The selector for ``[B, S, H, D]`` views ``q``/``k``, or None (the original runs)."""
        head_size, rotary_dim = q.shape[-1], forward.cache.shape[-1]
        if q.dim() != 4 or k.dim() != 4:
            return None
        # Decode (S == 1) and prefill views have different strides: each is checked once.
        sig = (q.shape[2], k.shape[2], head_size, rotary_dim, q.dtype, q.device, q.shape[1] == 1)
        try:
            return self._selectors[sig]
        except KeyError:
            pass
        selector = None
        try:
            selector = select_rope(
                head_size, rotary_dim, q.shape[2], k.shape[2], True, q.dtype, q.device,
                **self._options,
            )  # fmt: skip
            selector.check(positions, q, k, forward.cache)
        except (ValueError, TypeError) as exc:
            logger.warning("rope-autotune: transformers' own RoPE runs for %s: %s", sig, exc)
            selector = None
        else:
            logger.info("rope-autotune: transformers RoPE runs %s", selector)
        self._selectors[sig] = selector
        return selector

    # -- inspection and undo -------------------------------------------------------------------

    def selectors(self) -> list[RopeSelector]:
        """The selectors built so far (one per head layout, dtype and device)."""
        return [s for s in self._selectors.values() if s is not None]

    def remove(self) -> None:
        """Undo :func:`patch_model`: hooks removed, the original functions back (when no other
        patched model uses them). Safe to call twice."""
        with _LOCK:
            for hook in self._hooks:
                hook.remove()
            self._hooks = []
            for module_patch in self._module_patches:
                for key in [k for k, f in module_patch.forwards.items() if f.patch is self]:
                    del module_patch.forwards[key]
                module_patch.users -= 1
                if module_patch.users == 0:
                    if getattr(module_patch.module, _FUNCTION) is module_patch.wrapper:
                        setattr(module_patch.module, _FUNCTION, module_patch.original)
                    _MODULE_PATCHES.pop(module_patch.module.__name__, None)
            self._module_patches = []
            model = self._model()
            if model is not None and model.__dict__.get(_ATTRIBUTE) is self:
                del model.__dict__[_ATTRIBUTE]

    def __enter__(self) -> RopePatch:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        modules = [p.module.__name__ for p in self._module_patches]
        return (
            f"RopePatch(modules={modules}, rotary={list(self.rotary_modules)}, "
            f"calls={self.calls}, fallbacks={self.fallbacks})"
        )


def _neox_rotation_fails(fn: Callable, extra: int = 0) -> str | None:
    """Why ``fn(q, k, cos, sin)`` is not the NeoX rotation of each head's first ``cos.shape[-1]``
    elements (the other ``extra`` left as they are) on random ``[B, H, S, D]`` inputs, or None."""
    gen = torch.Generator().manual_seed(0)
    batch, heads, seq, rotary = 2, 2, 3, 8
    width = rotary + extra
    q = torch.randn(batch, seq, heads, width, generator=gen).transpose(1, 2)
    k = torch.randn(batch, seq, 1, width, generator=gen).transpose(1, 2)
    angles = torch.randn(batch, seq, rotary // 2, generator=gen)
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    try:
        got = fn(
            q.clone(), k.clone(), cos.squeeze(1).repeat(1, 1, 2), sin.squeeze(1).repeat(1, 1, 2)
        )
    except Exception as exc:
        return f"it raised {exc!r}"
    half = rotary // 2
    for x, out in zip((q, k), got, strict=True):
        x1, x2, rest = x[..., :half], x[..., half:rotary], x[..., rotary:]
        want = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), -1)
        if out.shape != want.shape or not torch.allclose(out, want, atol=1e-5, rtol=1e-5):
            return "it is not the NeoX rotation by cos/sin [B, S, D]"
    return None


def _probe_rotary(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``module``'s output is not ``cos``/``sin`` ``[B, S, D]`` with equal halves, or None."""
    x = torch.zeros(1, 3, 1, device=device, dtype=dtype)
    positions = torch.arange(3, device=device)[None]
    try:
        with torch.no_grad():
            cos, sin = module(x, positions)
    except Exception as exc:
        # Multimodal text rotary modules of some transformers 5 releases index three position
        # streams and take only [3, B, S] (equal streams: text positions).
        try:
            with torch.no_grad():
                cos, sin = module(x, positions.expand(3, 1, 3))
        except Exception:
            return f"calling it as rotary(x, position_ids) raised {exc!r}"
    if cos.dim() == 4 and cos.shape[:3] == (3, 1, 3):
        return (
            f"it returned per-stream cos of shape {tuple(cos.shape)} ([3, B, S, D], multimodal "
            "RoPE merged inside the attention layers), not one per-token [B, S, D]"
        )
    if cos.dim() != 3 or cos.shape[:2] != (1, 3) or sin.shape != cos.shape or cos.shape[-1] % 2:
        return f"it returned cos of shape {tuple(cos.shape)}, not [B, S, D]"
    half = cos.shape[-1] // 2
    halves_equal = torch.equal(cos[..., :half], cos[..., half:]) and torch.equal(
        sin[..., :half], sin[..., half:]
    )
    if not halves_equal:
        return "its cos/sin halves differ (not one frequency per rotated pair)"
    return None


def patch_model(
    model: torch.nn.Module,
    *,
    timing: str = "eager",
    table_dir: Any = None,
    provider: str | None = None,
    config: dict | None = None,
) -> RopePatch:
    """Make ``model`` (a loaded transformers model) apply RoPE through ``select_rope``.

    Args:
        model: A transformers ``PreTrainedModel`` (or any module holding one).
        timing: The table entries to follow; ``"eager"`` (default: transformers runs eagerly)
            or ``"graph"``.
        table_dir, provider, config: Passed to :func:`kernels.select_rope`
            (``ROPE_AUTOTUNE_TUNE=first-use`` in the environment tunes a spec the tables lack
            when its selector is built, at the first forward: :mod:`kernels.first_use`).

    Returns:
        A :class:`RopePatch`: ``.remove()`` undoes the patch; ``.calls`` counts the RoPE calls
        that ran through a selector; ``.selectors()`` lists them (``explain()`` says what runs).

    Raises:
        ValueError: ``model`` is patched already, or has no RoPE code path this adapter bridges
            (the message says why).
    """
    if model.__dict__.get(_ATTRIBUTE) is not None:
        raise ValueError("model: rope-autotune is applied already (call .remove() first)")
    options = {"timing": timing, "table_dir": table_dir, "provider": provider, "config": config}
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None else torch.float32

    modules: dict[str, ModuleType] = {}
    rotary_modules, refused = [], []
    for sub in model.modules():
        module = sys.modules.get(type(sub).__module__)
        if module is None or not callable(getattr(module, _FUNCTION, None)):
            continue
        modules[module.__name__] = module
        if type(sub).__name__.endswith("RotaryEmbedding"):
            reason = _probe_rotary(sub, device, dtype)
            if reason is None:
                rotary_modules.append(sub)
            else:
                refused.append((type(sub).__name__, reason))
    if not rotary_modules:
        why = "; ".join(f"{name}: {reason}" for name, reason in refused)
        why = why or f"no *RotaryEmbedding module in a module defining {_FUNCTION}"
        raise ValueError(f"model: no RoPE code path rope-autotune can bridge ({why})")
    for name, reason in refused:
        logger.warning("rope-autotune: leaving %s to transformers: %s", name, reason)

    with _LOCK:
        module_patches = []
        for name, module in modules.items():
            module_patch = _MODULE_PATCHES.get(name)
            if module_patch is None:
                original = getattr(module, _FUNCTION)
                reason = _neox_rotation_fails(original)
                if reason is not None:
                    logger.warning("rope-autotune: leaving %s.%s: %s", name, _FUNCTION, reason)
                    continue
                # Some (GPT-NeoX's) rotate the first cos.shape[-1] elements of a wider head.
                partial = _neox_rotation_fails(original, extra=4) is None
                module_patch = _ModulePatch(module, original, partial)
                setattr(module, _FUNCTION, module_patch.wrapper)
                _MODULE_PATCHES[name] = module_patch
            module_patch.users += 1
            module_patches.append(module_patch)
        if not module_patches:
            raise ValueError(f"model: no {_FUNCTION} in its modules is Llama's NeoX rotation")
        patch = RopePatch(model, module_patches, rotary_modules, options)
        model.__dict__[_ATTRIBUTE] = patch
    logger.info("rope-autotune: %r", patch)
    return patch


def unpatch_model(model: torch.nn.Module) -> bool:
    """Undo :func:`patch_model` on ``model``; False when it was not patched."""
    patch = model.__dict__.get(_ATTRIBUTE)
    if patch is None:
        return False
    patch.remove()
    return True
