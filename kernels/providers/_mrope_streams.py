"""A multimodal spec's stream map as a small device tensor, made once per device and kept.

The map (:attr:`kernels.RopeSpec.mrope_streams`) says which position stream each rotary
frequency takes its angle from; the ``torch`` providers gather with it and the Triton mRoPE
kernel loads it. The first call for a map and device allocates, so make it outside CUDA graph
capture (any warm-up call does, as for a converted cos/sin cache).
"""

from __future__ import annotations

import functools

import torch

__all__ = ["stream_tensor"]


@functools.lru_cache(maxsize=256)
def stream_tensor(
    streams: tuple[int, ...], length: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``streams`` repeated to ``length`` entries (or padded with stream 0 past the end when
    ``length`` is not a multiple), as a ``dtype`` tensor on ``device``.

    ``length == 2 * len(streams)`` gives a map over a whole cos/sin row (cos half, sin half);
    a power of two at or above ``len(streams)`` gives a kernel's padded map.
    """
    whole = list(streams) * (length // len(streams))
    values = whole + [0] * (length - len(whole))
    return torch.tensor(values, dtype=dtype, device=device)
