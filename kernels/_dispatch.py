"""The callable :func:`kernels.select_rope` returns: per call, check, pick a bucket, run it.

Everything here is built at selection time (:mod:`kernels.selector`) and immutable after; the
per-call path is a metadata check, a bisect over precomputed boundaries and one provider call.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import _custom_op
from ._checks import call_checker, check_spec_args
from ._routes import Route, bucket_thresholds
from ._spec import RopeSpec

__all__ = ["Explanation", "RopeSelector"]

_is_compiling = torch.compiler.is_compiling  # one global lookup on the hot path


@dataclass(frozen=True)
class Explanation:
    """What :class:`RopeSelector` runs for one call, and why.

    Attributes:
        num_tokens: The token count asked about.
        has_key: Whether the call passes a key tensor.
        provider: Provider name.
        config: Its config.
        bucket: The bucket serving ``num_tokens``.
        source: The table file used, or None (fallback, forced provider).
        spec_key: The table's spec entry used (differs from the asked spec for a nearest match).
        why: The full reason, one line.
    """

    num_tokens: int
    has_key: bool
    provider: str
    config: Mapping[str, Any]
    bucket: int
    source: Path | None
    spec_key: str | None
    why: str

    def __str__(self) -> str:
        key = "with key" if self.has_key else "without key"
        return (
            f"{self.num_tokens} tokens ({key}) -> bucket {self.bucket}: {self.provider} "
            f"{dict(self.config)}\n  why: {self.why}"
        )


class RopeSelector:
    """The callable ``select_rope`` returns: ``rope(positions, query, key, cos_sin_cache)``.

    Immutable after construction, so it is safe to share between threads. Per eager call it
    checks the arguments' metadata against the spec (a few integer compares for the common
    layouts, :func:`kernels._checks.call_checker`), bisects a precomputed tuple of bucket
    boundaries, and calls that bucket's provider: no allocation, no host-device sync, nothing
    captured into a CUDA graph but the provider's own kernels. Inside ``torch.compile`` it is
    the custom op ``torch.ops.rope_autotune.rope``, whose body is this same call.

    ``timing`` is the timing mode of the table entries its routes follow: ``"eager"`` only where
    the table has eager entries for the spec; ``"graph"`` for graph entries, a prediction of the
    performance model (fit on graph timings) and the untuned fallback.
    """

    __slots__ = (
        "_check",
        "_fns",
        "_handle",
        "_keyless_fns",
        "_keyless_routes",
        "_routes",
        "_thresholds",
        "buckets",
        "debug",
        "device",
        "first_use",
        "source",
        "spec",
        "spec_key",
        "timing",
    )

    def __init__(
        self,
        spec: RopeSpec,
        device: torch.device,
        timing: str,
        buckets: tuple[int, ...],
        routes: tuple[Route, ...],
        keyless_routes: tuple[Route, ...],
        source: Path | None,
        spec_key: str | None,
        *,
        debug: bool = False,
        first_use: str | None = None,
    ) -> None:
        self.spec, self.device, self.timing, self.debug = spec, device, timing, debug
        self.first_use = first_use
        self.buckets, self.source, self.spec_key = buckets, source, spec_key
        self._routes, self._keyless_routes = routes, keyless_routes
        # The hot path's only data: the check, boundaries and callables, in tuples.
        self._check = call_checker(spec, device, debug=debug)
        self._thresholds = bucket_thresholds(buckets)
        self._fns = tuple(r.fn for r in routes)
        self._keyless_fns = tuple(r.fn for r in keyless_routes)
        self._handle = _custom_op.register_dispatch(self.__call__)

    def __call__(
        self,
        positions: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor | None,
        cos_sin_cache: torch.Tensor,
    ) -> None:
        """Rotate ``query`` and ``key`` in place (the providers' contract).

        Args:
            positions: int64 or int32, ``[T]`` or ``[B, S]``, contiguous, on the spec's device;
                each below ``cos_sin_cache.shape[0]`` (checked only in debug mode). For an mRoPE
                spec ``[3, T]`` (last dimension contiguous) or ``[T]`` (text only).
            query: ``[T, Hq*D]``, ``[T, Hq, D]``, ``[B, S, Hq*D]`` or ``[B, S, Hq, D]`` in the
                spec's dtype; strided views allowed, last dimension contiguous.
            key: The same with ``Hk`` heads, or None.
            cos_sin_cache: ``[max_position, rotary_dim]`` float32 or the query's dtype.

        Raises:
            TypeError, ValueError: an argument does not fit the spec, the device or the
                contract; the message names it. Nothing has been written then.
        """
        if _is_compiling():
            # One opaque op in the graph; the token count stays symbolic.
            torch.ops.rope_autotune.rope(positions, query, key, cos_sin_cache, self._handle)
            return
        num_tokens = self._check(positions, query, key, cos_sin_cache)
        fns = self._fns if key is not None else self._keyless_fns
        fns[bisect_left(self._thresholds, num_tokens)](positions, query, key, cos_sin_cache)

    def explain(self, num_tokens: int, *, has_key: bool = True) -> Explanation:
        """What a call with ``num_tokens`` tokens runs, and why (``print`` it for a summary).

        Raises:
            ValueError: ``num_tokens`` is not a non-negative int.
        """
        if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens < 0:
            raise ValueError(f"num_tokens: expected a non-negative int, got {num_tokens!r}")
        index = bisect_left(self._thresholds, num_tokens)
        route = (self._routes if has_key else self._keyless_routes)[index]
        return Explanation(
            num_tokens=num_tokens,
            has_key=has_key,
            provider=route.provider,
            config=dict(route.config),
            bucket=self.buckets[index],
            source=self.source,
            spec_key=self.spec_key,
            why=route.why if self.first_use is None else f"{route.why}; {self.first_use}",
        )

    def check(
        self,
        positions: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor | None,
        cos_sin_cache: torch.Tensor,
    ) -> None:
        """Validate one call's arguments against the contract and this selector's spec and device
        (host-side only; every call runs the same checks, this one also accepts arguments the
        fast path of a call would check more cheaply).

        Raises:
            TypeError, ValueError: the message names the argument, the expected and the actual.
        """
        check_spec_args(self.spec, self.device, positions, query, key, cos_sin_cache)

    def __repr__(self) -> str:
        return (
            f"RopeSelector({self.spec.key}, device={self.device}, timing={self.timing!r}, "
            f"buckets={len(self.buckets)}, source={self.source})"
        )
