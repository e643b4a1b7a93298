"""Convert a cos/sin cache to another dtype once, then hand back the same copy on every call."""

from __future__ import annotations

import threading
import weakref

import torch

__all__ = ["CastOnce"]


class CastOnce:
    """Memo of ``cache.to(dtype)`` keyed by the source tensor's identity and version.

    A serving stack passes the same cache tensor on every call, so the conversion runs once per
    cache; an in-place update of the source (its ``_version`` moves) converts again. The copy
    lives as long as its source. The first call for a cache allocates, so make it outside CUDA
    graph capture (any warm-up call does).
    """

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.conversions = 0  # how many copies were made: tests assert it stays at one
        self._copies: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def __call__(self, cache: torch.Tensor) -> torch.Tensor:
        if cache.dtype == self.dtype:
            return cache
        entry = self._copies.get(id(cache))
        if entry is not None and entry[0]() is cache and entry[1] == cache._version:
            return entry[2]
        with self._lock:
            converted = cache.to(self.dtype)
            key = id(cache)
            self._copies[key] = (
                weakref.ref(cache, lambda _: self._copies.pop(key, None)),
                cache._version,
                converted,
            )
            self.conversions += 1
        return converted
