"""One RoPE callable for a stack that runs some calls eagerly and captures others in CUDA graphs.

A table's ``graph`` entries are timed by graph replay (launch cost hidden), its ``eager`` entries
by back-to-back host calls (launch cost counted), and their winners differ at small token counts.
vLLM runs both ways in one process: captured graphs for batch sizes up to its capture sizes,
eager calls above them and under ``enforce_eager``. :func:`capture_aware` returns a callable that
follows the graph entries while the current CUDA stream is capturing and the eager entries
otherwise, or the graph selector alone when both would run the same thing in every bucket (a
table without eager entries): the per-call capture query is paid only where it changes a choice.
"""

from __future__ import annotations

import torch

from kernels import RopeSelector

__all__ = ["CaptureAwareRope", "capture_aware", "same_plan"]

_capturing = torch.cuda.is_current_stream_capturing


def _plan(selector: RopeSelector) -> tuple:
    """What runs per bucket, with and without a key: ``(bucket, provider, config)`` triples."""
    return tuple(
        (bucket, e.provider, tuple(sorted(e.config.items())))
        for bucket in selector.buckets
        for e in (selector.explain(bucket), selector.explain(bucket, has_key=False))
    )


def same_plan(a: RopeSelector, b: RopeSelector) -> bool:
    """Whether ``a`` and ``b`` run the same provider and config for every token count."""
    return a.buckets == b.buckets and _plan(a) == _plan(b)


class CaptureAwareRope:
    """``rope(positions, query, key, cos_sin_cache)``: ``graph`` while the current CUDA stream
    captures a graph, else ``eager``. Both selectors have the same spec and device, so either
    raises the same ``TypeError``/``ValueError`` for a call that does not fit it, before writing.
    """

    __slots__ = ("eager", "graph")

    def __init__(self, graph: RopeSelector, eager: RopeSelector) -> None:
        if graph.spec != eager.spec or graph.device != eager.device:
            raise ValueError(
                f"eager: expected a selector for {graph.spec.key} on {graph.device}, "
                f"got {eager.spec.key} on {eager.device}"
            )
        self.graph, self.eager = graph, eager

    def __call__(
        self,
        positions: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor | None,
        cos_sin_cache: torch.Tensor,
    ) -> None:
        (self.graph if _capturing() else self.eager)(positions, query, key, cos_sin_cache)

    def __repr__(self) -> str:
        return f"CaptureAwareRope(graph={self.graph!r}, eager={self.eager!r})"


def capture_aware(graph: RopeSelector, eager: RopeSelector) -> RopeSelector | CaptureAwareRope:
    """``graph`` when ``eager`` runs the same plan or the device is not a GPU (nothing is ever
    captured there), else a :class:`CaptureAwareRope` of the two."""
    if graph.device.type != "cuda" or same_plan(graph, eager):
        return graph
    return CaptureAwareRope(graph, eager)
