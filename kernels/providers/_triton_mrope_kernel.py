"""The Triton multimodal RoPE (mRoPE) kernel (device code only; the launcher is
:mod:`._triton_mrope`).

The RoPE kernel's design (:mod:`._triton_kernel`: q and k in one launch, ``BLOCK_T`` tokens per
program, head blocks of ``BLOCK_H`` dealt over ``HEAD_SPLIT`` programs, only the rotated slice
touched) with one change, in how a token block's cos/sin is loaded: frequency ``j`` of token
``t`` reads the cache row of ``positions[stream(j), t]``, ``stream`` being the layout's map (a
small int32 tensor, ``HALF_PAD`` long). So each stream's rows are read straight from the cache,
without first gathering ``[3, T, rotary_dim]`` as vLLM does. A text-only call (``[T]``
positions: every stream alike) passes a stride of 0 between streams, so it runs the same
compiled kernel as ``[3, T]`` calls. The heads are rotated by the RoPE kernel's own block
function.
"""

import triton
import triton.language as tl

from ._triton_kernel import _rotate_block

__all__ = ["mrope_kernel"]


# num_tokens changes every call, and so does the positions' stride between streams (a [3, T]
# tensor of its own, a slice of a longer buffer, 0 for text-only [T] positions): specializing on
# them (== 1, % 16, and so 0 apart) would only multiply compiles (a position is loaded once per
# token and stream, alignment buys nothing).
@triton.jit(do_not_specialize=["num_tokens", "pos_stride_s"])
def mrope_kernel(
    pos_ptr,
    q_ptr,
    k_ptr,
    cache_ptr,
    streams_ptr,  # [HALF_PAD] int32: the stream of each frequency (0 past ROT_HALF)
    num_tokens,
    pos_stride_s,  # elements between the streams' rows of [3, T] positions; 0 for [T]
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
    d = tl.arange(0, HALF_PAD)
    cs_mask = t_mask[:, None]
    if HALF_PAD != ROT_HALF:
        cs_mask = cs_mask & (d < ROT_HALF)[None, :]

    # This token block's cos/sin: each frequency from its stream's row, loaded once and reused
    # for every head below.
    stream = tl.load(streams_ptr + d)[None, :]
    p_t = tl.load(pos_ptr + t, mask=t_mask, other=0).to(tl.int64)
    p_h = tl.load(pos_ptr + pos_stride_s + t, mask=t_mask, other=0).to(tl.int64)
    p_w = tl.load(pos_ptr + 2 * pos_stride_s + t, mask=t_mask, other=0).to(tl.int64)
    pos = tl.where(stream == 0, p_t[:, None], tl.where(stream == 1, p_h[:, None], p_w[:, None]))
    cs_row = cache_ptr + pos * cache_stride + d[None, :]
    cos = tl.load(cs_row, mask=cs_mask, other=0.0).to(tl.float32)
    sin = tl.load(cs_row + ROT_HALF, mask=cs_mask, other=0.0).to(tl.float32)
    t = t.to(tl.int64)  # token offsets can pass 2**31 elements on large batches

    # As in the RoPE kernel: q and k head blocks numbered as one sequence, program pid_h takes
    # every HEAD_SPLIT-th.
    q_blocks = tl.cdiv(NUM_Q_HEADS, BLOCK_H)
    for hb in range(pid_h, q_blocks, HEAD_SPLIT):
        _rotate_block(
            q_ptr, t, t_mask, hb * BLOCK_H, q_stride_t, q_stride_h, cos, sin,
            NUM_Q_HEADS, ROT_HALF, HALF_PAD, IS_NEOX, BLOCK_H,
        )  # fmt: skip
    k_first = (pid_h + HEAD_SPLIT - q_blocks % HEAD_SPLIT) % HEAD_SPLIT  # combined q_blocks + hb
    for hb in range(k_first, tl.cdiv(NUM_K_HEADS, BLOCK_H), HEAD_SPLIT):
        _rotate_block(
            k_ptr, t, t_mask, hb * BLOCK_H, k_stride_t, k_stride_h, cos, sin,
            NUM_K_HEADS, ROT_HALF, HALF_PAD, IS_NEOX, BLOCK_H,
        )  # fmt: skip
