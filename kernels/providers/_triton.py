"""``triton``: our RoPE kernel. Kernel, then launcher, then provider.

Design: one launch rotates q and k. A program owns ``BLOCK_T`` tokens: it loads their positions
and cos/sin rows once, then walks over query heads and key heads ``BLOCK_H`` at a time,
reading and writing only the first ``rotary_dim`` elements of each head. ``HEAD_SPLIT`` deals a
token block's q and k head blocks out evenly over that many programs, for parallelism when there
are few tokens (each then loads the token block's cos/sin once). A ``HEAD_SPLIT`` of at least
the number of head blocks gives each program one head block: the launcher then starts one
program per block, none idle.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl

from .._checks import qk_layout
from .._spec import RopeSpec
from ._base import Config, Provider, RopeFn, register_provider

__all__ = ["TritonProvider", "default_triton_config", "launch_rope"]


@triton.jit
def _rotate_block(
    x_ptr,
    t_offsets,  # [BLOCK_T] int64 token indices
    t_mask,  # [BLOCK_T] token in range
    h_start,  # first head of this block
    stride_t,
    stride_h,
    cos,  # [BLOCK_T, HALF_PAD] float32
    sin,
    NUM_HEADS: tl.constexpr,
    ROT_HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    IS_NEOX: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    h = h_start + tl.arange(0, BLOCK_H)
    mask_th = t_mask[:, None]
    if NUM_HEADS % BLOCK_H != 0:  # decided at compile time: no head mask when blocks tile H
        mask_th = mask_th & (h < NUM_HEADS)[None, :]
    row = x_ptr + t_offsets[:, None] * stride_t + h[None, :] * stride_h  # [BLOCK_T, BLOCK_H]
    c = cos[:, None, :]
    s = sin[:, None, :]
    if IS_NEOX:
        # Element i pairs with i + ROT_HALF: two contiguous half-rows.
        d = tl.arange(0, HALF_PAD)
        mask = mask_th[:, :, None]
        if HALF_PAD != ROT_HALF:
            mask = mask & (d < ROT_HALF)[None, None, :]
        p1 = row[:, :, None] + d[None, None, :]
        p2 = p1 + ROT_HALF
        x1 = tl.load(p1, mask=mask).to(tl.float32)
        x2 = tl.load(p2, mask=mask).to(tl.float32)
        tl.store(p1, (x1 * c - x2 * s).to(x_ptr.dtype.element_ty), mask=mask)
        tl.store(p2, (x2 * c + x1 * s).to(x_ptr.dtype.element_ty), mask=mask)
    else:
        # Element 2i pairs with 2i+1: load the whole rotated row contiguously and split the
        # pairs in registers, rather than two stride-2 loads.
        d = tl.arange(0, 2 * HALF_PAD)
        mask = mask_th[:, :, None]
        if HALF_PAD != ROT_HALF:
            mask = mask & (d < 2 * ROT_HALF)[None, None, :]
        p = row[:, :, None] + d[None, None, :]
        x = tl.load(p, mask=mask).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, (x.shape[0], x.shape[1], HALF_PAD, 2)))
        o = tl.join(x1 * c - x2 * s, x2 * c + x1 * s)
        o = tl.reshape(o, (x.shape[0], x.shape[1], 2 * HALF_PAD))
        tl.store(p, o.to(x_ptr.dtype.element_ty), mask=mask)


# num_tokens changes every call: specializing on it (== 1, % 16) would only multiply compiles.
@triton.jit(do_not_specialize=["num_tokens"])
def _rope_kernel(
    pos_ptr,
    q_ptr,
    k_ptr,
    cache_ptr,
    num_tokens,
    q_stride_t,
    q_stride_h,
    k_stride_t,
    k_stride_h,
    cache_stride,
    NUM_Q_HEADS: tl.constexpr,  # Hq
    ROT_HALF: tl.constexpr,  # rotary_dim // 2
    HALF_PAD: tl.constexpr,  # ROT_HALF rounded up to a power of two (tl.arange needs one)
    IS_NEOX: tl.constexpr,  # NeoX (halves) or GPT-J (interleaved pairs)
    BLOCK_T: tl.constexpr,  # tokens per program
    BLOCK_H: tl.constexpr,  # heads per inner step
    HEAD_SPLIT: tl.constexpr,  # programs sharing one token block's q and k head blocks
    NUM_K_HEADS: tl.constexpr,  # Hk; 0 when there is no key (last: the launcher appends it)
):
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t < num_tokens
    pos = tl.load(pos_ptr + t, mask=t_mask, other=0).to(tl.int64)
    t = t.to(tl.int64)  # token offsets can pass 2**31 elements on large batches

    # This token block's cos/sin: loaded once, reused for every head below.
    d = tl.arange(0, HALF_PAD)
    cs_mask = t_mask[:, None]
    if HALF_PAD != ROT_HALF:
        cs_mask = cs_mask & (d < ROT_HALF)[None, :]
    cs_row = cache_ptr + pos[:, None] * cache_stride + d[None, :]
    cos = tl.load(cs_row, mask=cs_mask, other=0.0).to(tl.float32)
    sin = tl.load(cs_row + ROT_HALF, mask=cs_mask, other=0.0).to(tl.float32)

    # Query and key head blocks are numbered as one sequence (q's first) and program pid_h takes
    # every HEAD_SPLIT-th, so the programs of a token block share q and k work evenly.
    q_blocks = tl.cdiv(NUM_Q_HEADS, BLOCK_H)
    for hb in range(pid_h, q_blocks, HEAD_SPLIT):
        _rotate_block(
            q_ptr,
            t,
            t_mask,
            hb * BLOCK_H,
            q_stride_t,
            q_stride_h,
            cos,
            sin,
            NUM_Q_HEADS,
            ROT_HALF,
            HALF_PAD,
            IS_NEOX,
            BLOCK_H,
        )
    k_first = (pid_h + HEAD_SPLIT - q_blocks % HEAD_SPLIT) % HEAD_SPLIT  # combined q_blocks + hb
    for hb in range(k_first, tl.cdiv(NUM_K_HEADS, BLOCK_H), HEAD_SPLIT):
        _rotate_block(
            k_ptr,
            t,
            t_mask,
            hb * BLOCK_H,
            k_stride_t,
            k_stride_h,
            cos,
            sin,
            NUM_K_HEADS,
            ROT_HALF,
            HALF_PAD,
            IS_NEOX,
            BLOCK_H,
        )


# -- launcher ----------------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _current_stream(device_index: int) -> int:
    return torch._C._cuda_getCurrentRawStream(device_index)


try:  # where launch hooks live moved between Triton releases
    from triton import knobs as _knobs

    _launch_hooks = _knobs.runtime
except ImportError:  # Triton < 3.4
    from triton.compiler.compiler import CompiledKernel as _launch_hooks  # noqa: N813


def _launch_hooks_active() -> bool:
    # Triton >= 3.5 keeps a HookChain (empty unless a profiler registered a hook), older
    # releases None or a callable.
    hook = _launch_hooks.launch_enter_hook
    return hook is not None and bool(getattr(hook, "calls", True))


_POW2 = (1, 2, 4, 8, 16, 32, 64)
PARAM_SPACE: dict[str, tuple[Any, ...]] = {
    "block_t": _POW2,
    "block_h": (1, 2, 4, 8, 16, 32),
    "head_split": (1, 2, 4, 8, 16, 32, 64, 128),
    "num_warps": (1, 2, 4, 8),
    "num_stages": (1, 2, 3),
}
# Live float32 values per thread above which a tile spills registers: the kernel holds x1, x2
# (or x) and cos, sin for BLOCK_T x BLOCK_H x rotary_dim elements.
_MAX_ELEMS_PER_THREAD = 128
# Below this many tokens a call is latency-bound: spreading head blocks over programs beats
# streaming whole tokens (H200 sweep, benchmarks/results/roofline_small_tokens_h200.csv).
_FEW_TOKENS = 4096
# Below this many tokens, and with at least this many heads, one head per program is fastest.
_VERY_FEW_TOKENS = 1024
_MANY_HEADS = 16


def _tile_elems(spec: RopeSpec, block_t: int, block_h: int) -> int:
    return block_t * block_h * 2 * triton.next_power_of_2(spec.rotary_dim // 2)


def config_problems(spec: RopeSpec, config: Config) -> list[str]:
    """Why ``config`` cannot run ``spec`` well; empty when it can."""
    problems = []
    tile = _tile_elems(spec, config["block_t"], config["block_h"])
    if tile / (32 * config["num_warps"]) > _MAX_ELEMS_PER_THREAD:
        problems.append(
            f"a tile of block_t*block_h*rotary_dim = {tile} elements is over "
            f"{_MAX_ELEMS_PER_THREAD} per thread with num_warps={config['num_warps']}"
        )
    head_blocks = triton.cdiv(spec.num_heads, config["block_h"]) + triton.cdiv(
        spec.num_kv_heads, config["block_h"]
    )
    # Up to the power of two at or above the block count: one block per program. Anything
    # larger launches the same grid (the launcher clamps it) and would be a duplicate.
    if config["head_split"] > triton.next_power_of_2(head_blocks):
        problems.append(
            f"head_split={config['head_split']} is over "
            f"{triton.next_power_of_2(head_blocks)}, the power of two that already gives each "
            f"of the {head_blocks} query and key head blocks its own program"
        )
    if config["block_h"] > triton.next_power_of_2(spec.num_heads):
        problems.append(f"block_h={config['block_h']} is over the {spec.num_heads} query heads")
    return problems


def _floor_pow2(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def default_triton_config(spec: RopeSpec, num_tokens: int | None = None) -> Config:
    """A sound config without tuning, used when no table has an entry.

    Chosen from H200 sweeps (``benchmarks/roofline.py --sweep``):

    - 4096 tokens or more (or unknown): one token per program and up to 4096 elements per head
      step; this reached 97-99% of the copy roofline on full rotary at 32k-64k tokens.
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
        blocks = triton.cdiv(spec.num_heads, block_h) + triton.cdiv(spec.num_kv_heads, block_h)
        return {
            "block_t": block_t,
            "block_h": block_h,
            "head_split": min(max_split, triton.next_power_of_2(blocks)),
            "num_warps": 4,
            "num_stages": 1,
        }
    row = 2 * triton.next_power_of_2(spec.rotary_dim // 2)
    block_h = min(
        triton.next_power_of_2(spec.num_heads), max(1, 4096 // row), max(PARAM_SPACE["block_h"])
    )
    return {
        "block_t": 1,
        "block_h": block_h,
        "head_split": 1,
        "num_warps": 8 if block_h * row >= 2048 else 4,
        "num_stages": 1,
    }


class _Launcher:
    """Launches the kernel for one spec and config with the least host work per call.

    ``kernel[grid](...)`` spends tens of microseconds in Python binding arguments and hashing
    the specialization. Here the first call of each specialization goes through that path and
    keeps the compiled kernel; later calls hand the arguments straight to its launcher. The key
    mirrors what Triton specializes on: 16-byte alignment of pointers and, for integers, the
    value 1, divisibility by 16 and 32-bit range; plus the dtypes of positions and cache.
    """

    def __init__(self, spec: RopeSpec, config: Config) -> None:
        self.spec = spec
        self.block_t = config["block_t"]
        self.block_h = config["block_h"]
        self.head_split = config["head_split"]
        self.q_blocks = triton.cdiv(spec.num_heads, self.block_h)
        half = spec.rotary_dim // 2
        self.constexprs = dict(
            NUM_Q_HEADS=spec.num_heads,
            ROT_HALF=half,
            HALF_PAD=triton.next_power_of_2(half),
            IS_NEOX=spec.is_neox,
            BLOCK_T=self.block_t,
            BLOCK_H=self.block_h,
            HEAD_SPLIT=self.head_split,
        )
        self.options = dict(num_warps=config["num_warps"], num_stages=config["num_stages"])
        # Lean path: per specialization, the compiled kernel and its head grid (fixed by k_heads).
        self.compiled: dict[tuple, tuple[Any, int]] = {}
        self.lean = not _interpreting()

    def grid(self, num_tokens: int, k_heads: int) -> tuple[int, int]:
        """Programs over token blocks and over the head blocks of one token block: never
        more of the latter than there are q and k head blocks (none idle)."""
        k_blocks = (k_heads + self.block_h - 1) // self.block_h
        return (num_tokens + self.block_t - 1) // self.block_t, min(
            self.head_split, self.q_blocks + k_blocks
        )

    def __call__(self, positions, query, key, cos_sin_cache) -> None:
        num_tokens = positions.numel()
        if num_tokens == 0:
            return
        head_size = self.spec.head_size
        if query.dim() == 2:  # [T, H*D], the common case: skip the general layout parse
            q_stride_t, q_stride_h = query.stride(0), head_size
        else:
            _, _, q_stride_t, q_stride_h = qk_layout("query", query, head_size, num_tokens)
        if key is None:
            k, k_stride_t, k_stride_h, k_heads = query, 0, 0, 0
        elif key.dim() == 2:
            k, k_stride_t, k_stride_h = key, key.stride(0), head_size
            k_heads = key.shape[1] // head_size
        else:
            k = key
            _, k_heads, k_stride_t, k_stride_h = qk_layout("key", key, head_size, num_tokens)
        cache_stride = cos_sin_cache.stride(0)
        ints = (q_stride_t, q_stride_h, k_stride_t, k_stride_h, cache_stride)
        # Launch hooks (profilers such as Proton) need Triton's own path and its metadata.
        lean = self.lean and not _launch_hooks_active()
        if lean:
            spec_key = (
                k_heads, positions.dtype, cos_sin_cache.dtype, query.device.index,
                positions.data_ptr() % 16 == 0, query.data_ptr() % 16 == 0,
                k.data_ptr() % 16 == 0, cos_sin_cache.data_ptr() % 16 == 0,
                *[(v == 1, v % 16 == 0, v < 2**31) for v in ints],
            )  # fmt: skip
            entry = self.compiled.get(spec_key)
            if entry is not None:
                compiled, grid_h = entry
                grid_t = (num_tokens + self.block_t - 1) // self.block_t
                compiled.run(
                    grid_t, grid_h, 1, _current_stream(query.device.index),
                    compiled.function, compiled.packed_metadata, None, None, None,
                    positions, query, k, cos_sin_cache, num_tokens, *ints,
                    *self.constexprs.values(), k_heads,
                )  # fmt: skip
                return
        grid = self.grid(num_tokens, k_heads)
        compiled = _rope_kernel[grid](
            positions, query, k, cos_sin_cache, num_tokens, *ints,
            NUM_K_HEADS=k_heads, **self.constexprs, **self.options,
        )  # fmt: skip
        if lean:
            self.compiled[spec_key] = compiled, grid[1]

    def compile(self, positions, query, key, cos_sin_cache) -> None:
        """Compile the kernel these arguments would launch into Triton's cache, without
        launching it (ahead-of-time compile workers: they need no GPU work, and a later
        launch with arguments of the same specialization loads the kernel from the cache).

        The arguments may live on the CPU: what Triton specializes on (dtypes, 16-byte
        alignment, integer values) is the same there. Under the interpreter, nothing happens.
        """
        num_tokens = positions.numel()
        if num_tokens == 0:
            return
        head_size = self.spec.head_size
        _, _, q_stride_t, q_stride_h = qk_layout("query", query, head_size, num_tokens)
        if key is None:  # as __call__ does: no key heads, the query stands in for the pointer
            key, k_heads, k_stride_t, k_stride_h = query, 0, 0, 0
        else:
            _, k_heads, k_stride_t, k_stride_h = qk_layout("key", key, head_size, num_tokens)
        _rope_kernel.warmup(
            positions, query, key, cos_sin_cache, num_tokens,
            q_stride_t, q_stride_h, k_stride_t, k_stride_h, cos_sin_cache.stride(0),
            grid=self.grid(num_tokens, k_heads), NUM_K_HEADS=k_heads, **self.constexprs,
            **self.options,
        )  # fmt: skip


def launch_rope(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    cos_sin_cache: torch.Tensor,
    spec: RopeSpec,
    config: Config,
) -> None:
    """Launch the kernel once on tensors already checked against ``spec`` (no launcher reuse)."""
    _Launcher(spec, config)(positions, query, key, cos_sin_cache)


# -- provider ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TritonProvider(Provider):
    name: str = "triton"
    description: str = "rope-autotune's Triton kernel: q and k in one launch, rotated part only"
    param_space: dict[str, tuple[Any, ...]] = field(default_factory=lambda: dict(PARAM_SPACE))
    # 2: q and k head blocks shared evenly over a token block's programs; head_split up to 32.
    # 3: head_split up to 128, one program per head block when it reaches the block count.
    revision: int = 3

    def unavailable_reason(self, device: torch.device | str) -> str | None:
        device = torch.device(device)
        if device.type == "cuda":
            return None if torch.cuda.is_available() else "CUDA is not available"
        if device.type == "cpu" and _interpreting():
            return None
        return f"runs on CUDA devices (or the CPU under TRITON_INTERPRET=1), not {device.type}"

    def default_config(self, spec: RopeSpec, num_tokens: int | None = None) -> Config:
        return default_triton_config(spec, num_tokens)

    def check_config(self, spec: RopeSpec, config: Config | None) -> Config:
        full = super().check_config(spec, config)
        problems = config_problems(spec, full)
        if problems:
            raise ValueError(f"config: invalid for {spec.key}: " + "; ".join(problems))
        return full

    def bind(self, spec: RopeSpec, config: Config) -> RopeFn:
        return _Launcher(spec, config)


register_provider(TritonProvider())
