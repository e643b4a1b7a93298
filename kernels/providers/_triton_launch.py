"""Launching :func:`rope_kernel` with the least host work per call.

``kernel[grid](...)`` (Triton's public launch) spends tens of microseconds in Python binding
arguments and hashing the specialization. :class:`TritonLauncher` launches each
specialization's first call that way and keeps the compiled kernel; later calls hand the
arguments straight to ``compiled.run``, a private Triton interface whose argument order is
pinned here to the Triton releases it is tested on (:data:`FAST_LAUNCH_VERSIONS`). Any other
release, the interpreter, and a registered launch hook (profilers) take the public launch.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton

from .._checks import qk_layout
from .._spec import RopeSpec
from ._triton_geometry import TritonGeometry
from ._triton_kernel import rope_kernel

__all__ = [
    "FAST_LAUNCH_VERSIONS",
    "MAX_FAST_ENTRIES",
    "TritonLauncher",
    "fast_launch_supported",
    "launch_hooks_active",
    "launch_rope",
]

# Triton releases (major.minor) whose CompiledKernel.run takes
# (grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata, enter_hook,
# exit_hook, *kernel arguments in signature order, constexprs included), as their own
# JITFunction.run passes them (docs/DESIGN.md#fast-launch).
FAST_LAUNCH_VERSIONS = ("3.6", "3.9")

# Fast-path entries one launcher keeps at most (a serving process needs a handful: one per
# layout, with and without a key).
MAX_FAST_ENTRIES = 64


def fast_launch_supported(version: str) -> bool:
    """Whether the fast path's argument order is the one of Triton ``version``."""
    return ".".join(version.split(".")[:2]) in FAST_LAUNCH_VERSIONS


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _current_stream(device_index: int) -> int:
    return torch._C._cuda_getCurrentRawStream(device_index)


try:  # where launch hooks live moved between Triton releases
    from triton import knobs as _knobs

    _launch_hooks = _knobs.runtime
except ImportError:  # Triton < 3.4
    from triton.compiler.compiler import CompiledKernel as _launch_hooks  # noqa: N813


def launch_hooks_active() -> bool:
    """Whether a launch hook (a profiler such as Proton) is registered with Triton: launches
    then take Triton's public path, which runs the hooks (checked on every call)."""
    # Triton >= 3.5 keeps a HookChain (empty unless a profiler registered a hook), older
    # releases None or a callable.
    hook = _launch_hooks.launch_enter_hook
    return hook is not None and bool(getattr(hook, "calls", True))


class TritonLauncher:
    """Launches :func:`rope_kernel` for one spec and config on tensors already checked.

    The fast path's cache key holds what decides the compiled kernel: each pointer's 16-byte
    alignment, the dtypes of positions and cache, the device, the key head count (a constexpr)
    and the strides. Strides are keyed by value, not by Triton's classes of them (1, divisible
    by 16, 32-bit): a layer's strides do not change between calls, and a tuple of values costs
    less to hash than the classes cost to compute.

    Args:
        spec: The spec the tensors follow.
        config: A complete, checked config (``block_t``, ``block_h``, ``head_split``,
            ``num_warps``, ``num_stages``).
        kernel: The JIT kernel (tests pass a wrapper).
        fast: Use the fast path; None decides from the Triton version and the interpreter.
    """

    def __init__(
        self,
        spec: RopeSpec,
        config: dict[str, Any],
        *,
        kernel: Any = rope_kernel,
        fast: bool | None = None,
    ) -> None:
        self.spec, self.kernel = spec, kernel
        # Per call with and without a key: the grid and the constexprs come from here.
        self.geometry = TritonGeometry.of(spec, config)
        self.keyless_geometry = TritonGeometry.of(spec, config, has_key=False)
        g = self.geometry
        # In the kernel's signature order: the fast path passes them positionally.
        self.constexprs = dict(
            NUM_Q_HEADS=spec.num_heads,
            ROT_HALF=g.rot_half,
            HALF_PAD=g.half_pad,
            IS_NEOX=spec.is_neox,
            BLOCK_T=g.block_t,
            BLOCK_H=g.block_h,
            HEAD_SPLIT=g.head_split,
        )
        self.constexpr_values = tuple(self.constexprs.values())
        self.block_t = g.block_t  # the fast path's token blocks: -(-num_tokens // block_t)
        self.options = dict(num_warps=config["num_warps"], num_stages=config["num_stages"])
        if fast is None:
            fast = fast_launch_supported(triton.__version__) and not _interpreting()
        self.fast = fast
        # Fast path: per specialization, the compiled kernel and its head grid.
        self.compiled: dict[tuple, tuple[Any, int]] = {}

    def grid(self, num_tokens: int, has_key: bool) -> tuple[int, int]:
        """The launch grid of a call (:meth:`TritonGeometry.grid`)."""
        return (self.geometry if has_key else self.keyless_geometry).grid(num_tokens)

    def _arguments(self, positions, query, key, num_tokens):
        """The kernel's key tensor, its integer arguments after the token count, and Hk."""
        # Per call, so x.stride()[0], not x.stride(0): the tuple is about half the host time.
        head_size = self.spec.head_size
        if query.dim() == 2:  # [T, H*D], the common case: skip the general layout parse
            q_stride_t, q_stride_h = query.stride()[0], head_size
        else:
            _, _, q_stride_t, q_stride_h = qk_layout("query", query, head_size, num_tokens)
        if key is None:
            k, k_stride_t, k_stride_h, k_heads = query, 0, 0, 0
        elif key.dim() == 2:  # its shape was checked: the spec's Hk heads
            k, k_stride_t, k_stride_h = key, key.stride()[0], head_size
            k_heads = self.spec.num_kv_heads
        else:
            k = key
            _, k_heads, k_stride_t, k_stride_h = qk_layout("key", key, head_size, num_tokens)
        return k, (q_stride_t, q_stride_h, k_stride_t, k_stride_h), k_heads

    def __call__(self, positions, query, key, cos_sin_cache) -> None:
        num_tokens = positions.numel()
        if num_tokens == 0:
            return
        k, strides, k_heads = self._arguments(positions, query, key, num_tokens)
        ints = (*strides, cos_sin_cache.stride()[0])
        # Launch hooks (profilers such as Proton) need Triton's own path and its metadata.
        fast = self.fast and not launch_hooks_active()
        if fast:
            device = query.get_device()
            specialization = (
                k_heads, positions.dtype, cos_sin_cache.dtype, device,
                positions.data_ptr() % 16 == 0, query.data_ptr() % 16 == 0,
                k.data_ptr() % 16 == 0, cos_sin_cache.data_ptr() % 16 == 0, ints,
            )  # fmt: skip
            entry = self.compiled.get(specialization)
            if entry is not None:
                compiled, grid_h = entry
                compiled.run(
                    -(-num_tokens // self.block_t), grid_h, 1, _current_stream(device),
                    compiled.function, compiled.packed_metadata, None, None, None,
                    positions, query, k, cos_sin_cache, num_tokens, *ints,
                    *self.constexpr_values, k_heads,
                )  # fmt: skip
                return
        grid = self.grid(num_tokens, k_heads > 0)
        compiled = self.kernel[grid](
            positions, query, k, cos_sin_cache, num_tokens, *ints,
            NUM_K_HEADS=k_heads, **self.constexprs, **self.options,
        )  # fmt: skip
        if fast and compiled is not None:
            self._keep(specialization, compiled, grid[1])

    def _keep(self, specialization: tuple, compiled: Any, grid_h: int) -> None:
        """Remember a public launch's compiled kernel for the fast path. Strides are keyed by
        value, so a caller whose strides change from call to call (a ``[B, H, S, D]`` tensor of
        its own with S varying) adds an entry per value: past :data:`MAX_FAST_ENTRIES` the
        cache starts over, bounding its memory (each entry costs one public launch)."""
        if len(self.compiled) >= MAX_FAST_ENTRIES:
            self.compiled.clear()
        self.compiled[specialization] = compiled, grid_h

    def compile_for(self, positions, query, key, cos_sin_cache) -> None:
        """Compile the kernel a call on these tensors runs, without running it (Triton's
        ``warmup``). Inside ``triton.AsyncCompileMode`` the compile goes to that mode's
        executor, and the first call on tensors like these finds it done. Nothing to do under
        the interpreter."""
        if _interpreting():
            return
        num_tokens = max(positions.numel(), 1)
        k, strides, k_heads = self._arguments(positions, query, key, num_tokens)
        self.kernel.warmup(
            positions, query, k, cos_sin_cache, num_tokens, *strides, cos_sin_cache.stride(0),
            NUM_K_HEADS=k_heads, **self.constexprs, **self.options, grid=(1,),
        )  # fmt: skip


def launch_rope(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    cos_sin_cache: torch.Tensor,
    spec: RopeSpec,
    config: dict[str, Any],
) -> None:
    """Launch the kernel once through Triton's public launch, on tensors already checked
    against ``spec`` (no fast path, nothing kept)."""
    TritonLauncher(spec, config, fast=False)(positions, query, key, cos_sin_cache)
