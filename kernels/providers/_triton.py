"""``triton``: our RoPE kernel as a provider: its tuning space, its restrictions, its default
configs, its model features, and its registration.

The kernel is :mod:`._triton_kernel`, its launcher :mod:`._triton_launch`, its layout of a call
:mod:`._triton_geometry`, its features :mod:`._triton_features`. The space and the restrictions
are plain data the tuner reads: :data:`PARAM_SPACE` (each parameter's values) and
:data:`RESTRICTIONS` (rules a config must meet for a spec, each with its reason).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .._spec import RopeSpec
from ._base import Config, Provider, Restriction, RopeFn, cuda_only_reason, register_provider
from ._triton_features import TRITON_FEATURES, triton_features
from ._triton_geometry import TritonGeometry, next_pow2, padded_row
from ._triton_launch import TritonLauncher, _interpreting

__all__ = [
    "PARAM_SPACE",
    "RESTRICTIONS",
    "TRITON",
    "TritonProvider",
    "config_problems",
    "default_triton_config",
]

# The provider's registry name.
TRITON = "triton"

# -- tuning space --------------------------------------------------------------------------------

PARAM_SPACE: dict[str, tuple[int, ...]] = {
    "block_t": (1, 2, 4, 8, 16, 32, 64),  # tokens per program (BLOCK_T)
    "block_h": (1, 2, 4, 8, 16, 32),  # heads per inner step (BLOCK_H)
    "head_split": (1, 2, 4, 8, 16, 32, 64, 128),  # programs per token block (HEAD_SPLIT)
    "num_warps": (1, 2, 4, 8),
    "num_stages": (1, 2, 3),
}

# Live float32 values per thread above which a tile spills registers: the kernel holds x1, x2
# (or x) and cos, sin for BLOCK_T x BLOCK_H x rotary_dim elements.
MAX_ELEMS_PER_THREAD = 128


RESTRICTIONS: tuple[Restriction, ...] = (
    Restriction(
        "registers",
        lambda s, c: (
            TritonGeometry.of(s, c).elems_per_thread(c["num_warps"]) <= MAX_ELEMS_PER_THREAD
        ),
        "a tile of block_t*block_h*rotary_dim = {tile} elements is over "
        "{max_elems} per thread with num_warps={config[num_warps]}",
    ),
    # Up to the power of two at or above the block count: one block per program. Anything
    # larger launches the same grid (the launcher clamps it) and would be a duplicate.
    Restriction(
        "head_split",
        lambda s, c: c["head_split"] <= TritonGeometry.of(s, c).full_split,
        "head_split={config[head_split]} is over {split_cap}, the power of two that already "
        "gives each of the {blocks} query and key head blocks its own program",
    ),
    Restriction(
        "block_h",
        lambda s, c: c["block_h"] <= next_pow2(s.num_heads),
        "block_h={config[block_h]} is over the {spec.num_heads} query heads",
    ),
)


def _facts(spec: RopeSpec, config: Config) -> dict[str, Any]:
    geometry = TritonGeometry.of(spec, config)
    return {
        "tile": geometry.tile,
        "max_elems": MAX_ELEMS_PER_THREAD,
        "blocks": geometry.head_blocks,
        "split_cap": geometry.full_split,
    }


# -- defaults ------------------------------------------------------------------------------------

# Below this many tokens a call is latency-bound: spreading head blocks over programs beats
# streaming whole tokens (docs/DESIGN.md#default-config).
_FEW_TOKENS = 4096
# Below this many tokens, and with at least this many heads, one head per program is fastest.
_VERY_FEW_TOKENS = 1024
_MANY_HEADS = 16


def _floor_pow2(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def default_triton_config(spec: RopeSpec, num_tokens: int | None = None) -> Config:
    """A sound config without tuning, used when no table has an entry.

    The rule (why: ``docs/DESIGN.md#default-config``):

    - 4096 tokens or more (or unknown): one token per program and up to 4096 elements per head
      step (bandwidth-bound: whole tokens streamed).
    - Fewer tokens: the call is latency-bound, and what wins is many programs with one head
      block each (a program with two blocks takes two memory round trips, and the kernel
      waits for the slowest). Below 1024 tokens with 16 or more heads, one head per program
      over 2-4 tokens; otherwise blocks of up to 8 heads, one token per program.
    """
    heads = spec.num_heads + spec.num_kv_heads
    max_split = max(PARAM_SPACE["head_split"])
    if num_tokens is not None and num_tokens < _FEW_TOKENS:
        if num_tokens < _VERY_FEW_TOKENS and heads >= _MANY_HEADS:
            block_t, block_h = (2 if num_tokens < 64 else 4), 1
        else:
            block_t, block_h = 1, min(8, _floor_pow2(spec.num_heads))
        geometry = TritonGeometry(spec, block_t, block_h, head_split=1)
        return {
            "block_t": block_t,
            "block_h": block_h,
            "head_split": min(max_split, geometry.full_split),
            "num_warps": 4,
            "num_stages": 1,
        }
    row = padded_row(spec)
    block_h = min(next_pow2(spec.num_heads), max(1, 4096 // row), max(PARAM_SPACE["block_h"]))
    geometry = TritonGeometry(spec, 1, block_h, head_split=1)
    return {
        "block_t": 1,
        "block_h": block_h,
        "head_split": 1,
        "num_warps": 8 if geometry.tile >= 2048 else 4,
        "num_stages": 1,
    }


# -- provider ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TritonProvider(Provider):
    """The Triton kernel as a provider.

    Attributes:
        fast_launch: Whether its launchers take the fast path (:class:`TritonLauncher`); None
            decides from the Triton release and the interpreter, False always takes Triton's
            public launch (profilers, experiments).
    """

    name: str = TRITON
    description: str = "rope-autotune's Triton kernel: q and k in one launch, rotated part only"
    param_space: dict[str, tuple[Any, ...]] = field(default_factory=lambda: dict(PARAM_SPACE))
    # 2: q and k head blocks shared evenly over a token block's programs; head_split up to 32.
    # 3: head_split up to 128, one program per head block when it reaches the block count.
    revision: int = 3
    restrictions: tuple[Restriction, ...] = RESTRICTIONS
    fallback_on: tuple[str, ...] = ("cuda",)
    fast_launch: bool | None = None

    def unavailable_reason(self, device: torch.device | str) -> str | None:
        device = torch.device(device)
        if device.type == "cuda":
            return cuda_only_reason(device)
        if device.type == "cpu" and _interpreting():
            return None
        return f"runs on CUDA devices (or the CPU under TRITON_INTERPRET=1), not {device.type}"

    def default_config(self, spec: RopeSpec, num_tokens: int | None = None) -> Config:
        return default_triton_config(spec, num_tokens)

    def restriction_facts(self, spec: RopeSpec, config: Config) -> dict[str, Any]:
        return _facts(spec, config)

    def feature_names(self) -> tuple[str, ...]:
        return TRITON_FEATURES

    def features(
        self, spec: RopeSpec, num_tokens: int, config: Config | None = None, *, sm_count: int
    ) -> list[float]:
        if config is None:
            raise ValueError(f"config: the {self.name} provider's features depend on its config")
        return triton_features(spec, num_tokens, config, sm_count=sm_count)

    def build(self, spec: RopeSpec, config: Config) -> RopeFn:
        return TritonLauncher(spec, config, fast=self.fast_launch)


_PROVIDER = register_provider(TritonProvider())


def config_problems(spec: RopeSpec, config: Config) -> list[str]:
    """The reasons of every restriction ``config`` breaks for ``spec``; empty when none
    (:meth:`Provider.config_problems` of the registered Triton provider)."""
    return _PROVIDER.config_problems(spec, config)
