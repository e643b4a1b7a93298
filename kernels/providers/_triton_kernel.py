"""The Triton RoPE kernel (device code only; the launcher is :mod:`._triton_launch`).

Design: one launch rotates q and k. A program owns ``BLOCK_T`` tokens: it loads their positions
and cos/sin rows once, then walks over query heads and key heads ``BLOCK_H`` at a time,
reading and writing only the first ``rotary_dim`` elements of each head. ``HEAD_SPLIT`` deals a
token block's q and k head blocks out evenly over that many programs, for parallelism when there
are few tokens (each then loads the token block's cos/sin once). A ``HEAD_SPLIT`` of at least
the number of head blocks gives each program one head block: the launcher then starts one
program per block, none idle. Arithmetic is float32 whatever the element type.
"""

import triton
import triton.language as tl

__all__ = ["rope_kernel"]


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
    NUM_HEADS: tl.constexpr,  # heads of this tensor (Hq or Hk)
    ROT_HALF: tl.constexpr,  # rotary_dim // 2
    HALF_PAD: tl.constexpr,  # ROT_HALF rounded up to a power of two (tl.arange needs one)
    IS_NEOX: tl.constexpr,  # NeoX (halves) or GPT-J (interleaved pairs)
    BLOCK_H: tl.constexpr,  # heads per step
):
    """Rotate heads ``h_start .. h_start + BLOCK_H`` of ``BLOCK_T`` tokens in place."""
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
def rope_kernel(
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
