"""``vllm``: vLLM's compiled ``torch.ops._C.rotary_embedding``, without vLLM's serving stack."""

from __future__ import annotations

import functools
import glob
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .._spec import RopeSpec
from ._base import Config, Provider, RopeFn, cuda_only_reason, register_provider
from ._torch import as_token_head_view

__all__ = ["VllmProvider", "load_vllm_rotary_op"]


@functools.cache
def load_vllm_rotary_op() -> Callable | str:
    """``torch.ops._C.rotary_embedding``, or why it cannot be had.

    Inside a vLLM server the op is registered already. Otherwise load the op library that sits
    beside the installed vllm package: ``find_spec`` locates the package without executing its
    ``__init__`` (which would import the whole serving stack).
    """
    if not hasattr(torch.ops._C, "rotary_embedding"):
        spec = importlib.util.find_spec("vllm")
        if spec is None or not spec.submodule_search_locations:
            return "vllm is not installed"
        package_dir = next(iter(spec.submodule_search_locations))
        libraries = sorted(glob.glob(os.path.join(package_dir, "_C*.so")))
        if not libraries:
            return f"no _C*.so op library in {package_dir}"
        try:
            torch.ops.load_library(libraries[0])
        except Exception as exc:  # an ABI mismatch with this torch raises OSError or others
            return f"cannot load {libraries[0]} ({type(exc).__name__}: {exc})"
        if not hasattr(torch.ops._C, "rotary_embedding"):
            return f"{libraries[0]} registers no rotary_embedding op"
    return torch.ops._C.rotary_embedding


@dataclass(frozen=True)
class VllmProvider(Provider):
    name: str = "vllm"
    description: str = "vLLM's CUDA op torch.ops._C.rotary_embedding (int32 positions widened)"

    def unavailable_reason(self, device: torch.device | str) -> str | None:
        op = cuda_only_reason(device) or load_vllm_rotary_op()
        return op if isinstance(op, str) else None

    def build(self, spec: RopeSpec, config: Config) -> RopeFn:
        op = load_vllm_rotary_op()
        if isinstance(op, str):
            raise RuntimeError(f"vllm: {op}")
        op = getattr(op, "default", op)  # the overload: the packet resolves it on every call
        head_size, is_neox, int64 = spec.head_size, spec.is_neox, torch.int64

        def run(positions, query, key, cos_sin_cache):
            # vLLM's own layout ([T] int64 positions, [T, H*D] q and k, strided views of a
            # fused qkv) goes to the op as it is: an eager call then costs the op's own host
            # time and four metadata reads.
            if (
                positions.dtype is int64
                and positions.dim() == 1
                and query.dim() == 2
                and (key is None or key.dim() == 2)
            ):
                op(positions, query, key, head_size, cos_sin_cache, is_neox)
                return
            n = positions.numel()
            q = as_token_head_view("query", query, head_size, n)
            k = None if key is None else as_token_head_view("key", key, head_size, n)
            # The op reads [B, S] positions as a batch layout (then rejects [T, H, D] q/k) and
            # reads positions as int64 only: hand it tokens as tokens, and widen int32 positions
            # (a per-call copy, the one allocation on this path; pass int64 to avoid it).
            if positions.dim() != 1:
                positions = positions.view(-1)
            if positions.dtype != int64:
                positions = positions.long()
            op(positions, q, k, head_size, cos_sin_cache, is_neox)

        return run


register_provider(VllmProvider())
