"""``torch_compile``: the eager math of ``torch`` compiled once per spec, token count dynamic."""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch

from .._spec import RopeSpec
from ._base import MROPE, ROPE, Config, Provider, RopeFn, register_provider
from ._torch import _mrope_run, as_token_head_view, rope_torch_

__all__ = ["TorchCompileProvider"]


def _rope_template(positions, query, key, cos_sin_cache):
    rope_torch_(positions, query, key, cos_sin_cache, ROTARY_DIM, IS_NEOX)  # noqa: F821


def _mrope_template(positions, query, key, cos_sin_cache, stream_index):
    rope_torch_(positions, query, key, cos_sin_cache, ROTARY_DIM, IS_NEOX, stream_index)  # noqa: F821


def _function_for(spec: RopeSpec):
    """A fresh function object *and code object* computing ``spec``.

    Dynamo keeps its compiled graphs and its recompile budget (8) on the code object; one shared
    code object for every spec would exhaust that budget after a handful of specs and dtypes.
    """
    template = _mrope_template if spec.is_mrope else _rope_template
    code = template.__code__.replace(co_name=f"rope_{spec.key}")
    scope = {**globals(), "ROTARY_DIM": spec.rotary_dim, "IS_NEOX": spec.is_neox}
    return types.FunctionType(code, scope, code.co_name)


@dataclass(frozen=True)
class TorchCompileProvider(Provider):
    name: str = "torch_compile"
    description: str = "torch.compile of the eager math, dynamic token count; CPU and GPU"
    layouts: tuple[str, ...] = (ROPE, MROPE)

    def build(self, spec: RopeSpec, config: Config) -> RopeFn:
        head_size = spec.head_size
        # dynamic=True makes the token count symbolic from the first call, so a new token count
        # reuses the graph instead of recompiling (sizes 0 and 1 may still specialize once).
        compiled = torch.compile(_function_for(spec), dynamic=True, fullgraph=True)
        if spec.is_mrope:
            # [3, T] and [T] positions each compile once; the stream index is an input.
            return _mrope_run(spec, compiled)

        def run(positions, query, key, cos_sin_cache):
            n = positions.numel()
            q = as_token_head_view("query", query, head_size, n)
            k = None if key is None else as_token_head_view("key", key, head_size, n)
            compiled(positions.reshape(-1), q, k, cos_sin_cache)

        return run


register_provider(TorchCompileProvider())
