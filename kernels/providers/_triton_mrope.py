"""``triton_mrope``: our multimodal RoPE kernel (:mod:`._triton_mrope_kernel`) as a provider, and
its launcher.

It computes mRoPE specs only (``[3, T]`` or text-only ``[T]`` positions). Its tuning space,
restrictions, default configs and model features are the RoPE kernel's
(:class:`~._triton.TritonProvider`): the two kernels lay a call out alike
(:class:`~._triton_geometry.TritonGeometry`), and only their cos/sin loads differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .._spec import RopeSpec
from ._base import MROPE, Config, RopeFn, register_provider
from ._mrope_streams import stream_tensor
from ._triton import TritonProvider
from ._triton_launch import TritonLauncher, _current_stream, _interpreting, launch_hooks_active
from ._triton_mrope_kernel import mrope_kernel

__all__ = ["TRITON_MROPE", "MropeLauncher", "TritonMropeProvider"]

# The provider's registry name.
TRITON_MROPE = "triton_mrope"


class MropeLauncher(TritonLauncher):
    """Launches :func:`mrope_kernel` for one mRoPE spec and config on tensors already checked,
    with the RoPE launcher's grid, constexprs and fast path (:class:`TritonLauncher`).

    Per call it adds the spec's stream map on the call's device (made on the first call there:
    make that call outside CUDA graph capture) and the positions' stride between streams (never
    specialized on; 0 for text-only ``[T]`` positions, so that ``[3, T]`` and ``[T]`` calls
    share one compiled kernel).

    Raises:
        ValueError: ``spec`` is not an mRoPE spec.
    """

    def __init__(
        self,
        spec: RopeSpec,
        config: dict[str, Any],
        *,
        kernel: Any = mrope_kernel,
        fast: bool | None = None,
    ) -> None:
        if not spec.is_mrope:
            raise ValueError(f"spec: {spec.key} is not an mRoPE spec")
        super().__init__(spec, config, kernel=kernel, fast=fast)
        self.streams = spec.mrope_streams
        self._stream_maps: dict[int, torch.Tensor] = {}  # by device index (-1: the CPU)

    def _stream_map(self, positions: torch.Tensor) -> torch.Tensor:
        """The stream map on the positions' device, made there on its first call. A call looks
        it up by the device index it has read already, and comes here on a miss."""
        index = positions.get_device()
        stream_map = self._stream_maps.get(index)
        if stream_map is None:
            stream_map = stream_tensor(
                self.streams, self.geometry.half_pad, torch.int32, positions.device
            )
            self._stream_maps[index] = stream_map
        return stream_map

    def __call__(self, positions, query, key, cos_sin_cache) -> None:
        # TritonLauncher.__call__ with this kernel's arguments, written out: a body shared
        # through a per-kernel argument method cost 3-5% more host time per fast-path call
        # (benchmarks/NOTES.md, experiments/launcher_host_cpu.py).
        num_tokens = positions.shape[-1]
        if num_tokens == 0:
            return
        k, strides, k_heads = self._arguments(positions, query, key, num_tokens)
        pos_stride = positions.stride()[0] if positions.dim() == 2 else 0  # not specialized on
        ints = (*strides, cos_sin_cache.stride()[0])
        device = query.get_device()  # the positions' too (checked)
        stream_map = self._stream_maps.get(device)
        if stream_map is None:
            stream_map = self._stream_map(positions)
        fast = self.fast and not launch_hooks_active()
        if fast:
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
                    positions, query, k, cos_sin_cache, stream_map, num_tokens, pos_stride,
                    *ints, *self.constexpr_values, k_heads,
                )  # fmt: skip
                return
        grid = self.grid(num_tokens, k_heads > 0)
        compiled = self.kernel[grid](
            positions, query, k, cos_sin_cache, stream_map, num_tokens, pos_stride, *ints,
            NUM_K_HEADS=k_heads, **self.constexprs, **self.options,
        )  # fmt: skip
        if fast and compiled is not None:
            self._keep(specialization, compiled, grid[1])

    def compile_for(self, positions, query, key, cos_sin_cache) -> None:
        """Compile the kernel a call on these tensors runs, without running it (as
        :meth:`TritonLauncher.compile_for`)."""
        if _interpreting():
            return
        num_tokens = max(positions.shape[-1], 1)
        k, strides, k_heads = self._arguments(positions, query, key, num_tokens)
        pos_stride = positions.stride(0) if positions.dim() == 2 else 0
        self.kernel.warmup(
            positions, query, k, cos_sin_cache, self._stream_map(positions), num_tokens,
            pos_stride, *strides, cos_sin_cache.stride(0),
            NUM_K_HEADS=k_heads, **self.constexprs, **self.options, grid=(1,),
        )  # fmt: skip


@dataclass(frozen=True)
class TritonMropeProvider(TritonProvider):
    """The Triton mRoPE kernel as a provider: the RoPE kernel's space, restrictions, defaults
    and features, for mRoPE specs only."""

    name: str = TRITON_MROPE
    description: str = (
        "rope-autotune's Triton mRoPE kernel: each stream's cos/sin rows read directly, q and k "
        "in one launch, rotated part only"
    )
    revision: int = 1
    layouts: tuple[str, ...] = (MROPE,)

    def build(self, spec: RopeSpec, config: Config) -> RopeFn:
        return MropeLauncher(spec, config, fast=self.fast_launch)


register_provider(TritonMropeProvider())
