"""Which timing's table entries a vLLM call follows: graph-timed ones for the token counts vLLM
captures in CUDA graphs, eager-timed ones for the calls it runs eagerly (``enforce_eager``, and
token counts above its largest capture size)."""

from __future__ import annotations

from typing import Any

import torch

from kernels import RopeSelector, select_rope

__all__ = ["CaptureSplit", "eager_above", "eager_aware"]


def eager_above(compilation_config: Any) -> int | None:
    """The token count above which vLLM runs a model's calls eagerly, from its compilation
    config: 0 when it captures no CUDA graph (``enforce_eager``, ``cudagraph_mode`` NONE), its
    largest capture size otherwise, None when the config does not say (not yet resolved by an
    engine): then every call follows graph entries, as captured calls must."""
    mode = getattr(compilation_config, "cudagraph_mode", None)
    if getattr(mode, "name", None) == "NONE":
        return 0
    size = getattr(compilation_config, "max_cudagraph_capture_size", None)
    if isinstance(size, int) and not isinstance(size, bool) and size >= 0:
        return size
    return None


class CaptureSplit:
    """One spec's calls: ``graph`` (a selector following graph entries) for at most ``above``
    tokens, the sizes vLLM captures (its warm-up calls of those sizes too, so their kernels are
    loaded before capture), ``eager`` (following eager entries) above them.

    Raises (per call, from the selector it calls):
        TypeError, ValueError: the arguments do not fit the spec; nothing has been written.
    """

    __slots__ = ("above", "eager", "graph", "spec")

    def __init__(self, graph: RopeSelector, eager: RopeSelector, above: int) -> None:
        if graph.spec != eager.spec:
            raise ValueError(f"eager: a selector for {eager.spec.key}, not {graph.spec.key}")
        self.graph, self.eager, self.above, self.spec = graph, eager, above, graph.spec

    def __call__(
        self,
        positions: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor | None,
        cos_sin_cache: torch.Tensor,
    ) -> None:
        # vLLM's positions are [T] or, for mRoPE, [3, T]: the last dimension counts tokens.
        selector = self.eager if positions.shape[-1] > self.above else self.graph
        selector(positions, query, key, cos_sin_cache)

    def selector(self, num_tokens: int) -> RopeSelector:
        """The selector a call of ``num_tokens`` tokens runs."""
        return self.eager if num_tokens > self.above else self.graph

    def __repr__(self) -> str:
        return f"CaptureSplit(graph up to {self.above} tokens: {self.graph}; above: {self.eager})"


def eager_aware(graph: RopeSelector, above: int | None) -> RopeSelector | CaptureSplit:
    """``graph``, or, where vLLM runs calls above ``above`` tokens eagerly and the tables hold
    eager entries for its spec (``python -m autotune --timing eager``; never tuned on first
    use), the eager selector for those calls (for every call at 0)."""
    if above is None:
        return graph
    spec = graph.spec
    eager = select_rope(
        spec.head_size, spec.rotary_dim, spec.num_heads, spec.num_kv_heads, spec.is_neox,
        spec.dtype, graph.device, timing="eager", tune="off", mrope_section=spec.mrope_section,
        mrope_interleaved=spec.mrope_interleaved,
    )  # fmt: skip
    if eager.timing != "eager":
        return graph
    return eager if above == 0 else CaptureSplit(graph, eager, above)
