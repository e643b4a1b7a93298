"""Experiment: how much of a mid-range call is the kernel's serial load chain, and does issuing
each program's first q/k rows before its positions shorten it?

Today's kernel (``kernels/providers/_triton_kernel.py``) loads a token block's positions, waits
for them, loads the cos/sin rows they index, and only then issues its q/k row loads: the rows'
memory round trip starts after the positions' round trip. ``early_rope_kernel`` issues the rows
of each program's first head block before the positions, so the two round trips overlap; it is
otherwise the same kernel (same configs, same arithmetic). Three floors with the same grid and
tiling, not RoPE (never checked, only timed): ``unchained_kernel`` indexes the cos/sin rows by
token instead of by position (the loads and arithmetic without the dependent round trip),
``rows_copy_kernel`` loads and stores the same rows with no positions and no cos/sin (the memory
pattern alone), ``empty_kernel`` does nothing (the launch alone).

For each unseen case (``unseen_shapes.py``) where the selector runs Triton, its config is timed
in today's kernel and these four, side by side in one run, after the float64 gate for the two
RoPE kernels.

    python benchmarks/experiments/early_loads.py --device cuda:0 --out $OUT/early_loads.csv
    TRITON_INTERPRET=1 python benchmarks/experiments/early_loads.py --cpu-smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unseen_shapes import Case, cases, geomean, selector_for, smoke_cases, write_csv

from kernels.measure import check_correct, time_rope
from kernels.providers import TritonLauncher


@triton.jit
def _tokens(num_tokens, BLOCK_T: tl.constexpr):
    """This program's tokens: int32 indices, their mask, int64 indices."""
    t32 = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    return t32, t32 < num_tokens, t32.to(tl.int64)


@triton.jit
def _cos_sin(
    cache_ptr, rows, t_mask, cache_stride, ROT_HALF: tl.constexpr, HALF_PAD: tl.constexpr
):  # fmt: skip
    """The cos and sin halves of cache ``rows``, ``[BLOCK_T, 1, HALF_PAD]`` float32."""
    d = tl.arange(0, HALF_PAD)
    mask = t_mask[:, None]
    if HALF_PAD != ROT_HALF:
        mask = mask & (d < ROT_HALF)[None, :]
    row = cache_ptr + rows[:, None] * cache_stride + d[None, :]
    cos = tl.load(row, mask=mask, other=0.0).to(tl.float32)[:, None, :]
    sin = tl.load(row + ROT_HALF, mask=mask, other=0.0).to(tl.float32)[:, None, :]
    return cos, sin


@triton.jit
def _rows(
    x_ptr, t, t_mask, h_start, stride_t, stride_h, num_heads,
    ROT_HALF: tl.constexpr, HALF_PAD: tl.constexpr, IS_NEOX: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """Pointers and mask of a head block's rotated rows: the first halves (NeoX) or the whole
    rotated rows (GPT-J), ``[BLOCK_T, BLOCK_H, HALF_PAD or 2 * HALF_PAD]``."""
    h = h_start + tl.arange(0, BLOCK_H)
    row = x_ptr + t[:, None] * stride_t + h[None, :] * stride_h
    mask = (t_mask[:, None] & (h < num_heads)[None, :])[:, :, None]
    if IS_NEOX:
        d = tl.arange(0, HALF_PAD)
        if HALF_PAD != ROT_HALF:
            mask = mask & (d < ROT_HALF)[None, None, :]
    else:
        d = tl.arange(0, 2 * HALF_PAD)
        if HALF_PAD != ROT_HALF:
            mask = mask & (d < 2 * ROT_HALF)[None, None, :]
    return row[:, :, None] + d[None, None, :], mask


@triton.jit
def _load(p, mask, ROT_HALF: tl.constexpr, HALF_PAD: tl.constexpr, IS_NEOX: tl.constexpr):
    if IS_NEOX:
        x1 = tl.load(p, mask=mask).to(tl.float32)
        x2 = tl.load(p + ROT_HALF, mask=mask).to(tl.float32)
    else:
        x = tl.load(p, mask=mask).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, (x.shape[0], x.shape[1], HALF_PAD, 2)))
    return x1, x2


@triton.jit
def _store(p, mask, o1, o2, ROT_HALF: tl.constexpr, IS_NEOX: tl.constexpr):
    if IS_NEOX:
        tl.store(p, o1.to(p.dtype.element_ty), mask=mask)
        tl.store(p + ROT_HALF, o2.to(p.dtype.element_ty), mask=mask)
    else:
        o = tl.reshape(tl.join(o1, o2), (o1.shape[0], o1.shape[1], 2 * o1.shape[2]))
        tl.store(p, o.to(p.dtype.element_ty), mask=mask)


@triton.jit
def _rotate(
    x_ptr, t, t_mask, h_start, stride_t, stride_h, cos, sin, num_heads,
    ROT_HALF: tl.constexpr, HALF_PAD: tl.constexpr, IS_NEOX: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    p, mask = _rows(
        x_ptr, t, t_mask, h_start, stride_t, stride_h, num_heads, ROT_HALF, HALF_PAD, IS_NEOX,
        BLOCK_H,
    )  # fmt: skip
    x1, x2 = _load(p, mask, ROT_HALF, HALF_PAD, IS_NEOX)
    _store(p, mask, x1 * cos - x2 * sin, x2 * cos + x1 * sin, ROT_HALF, IS_NEOX)


@triton.jit
def _rotate_blocks(
    q_ptr, k_ptr, t, t_mask, pid_h, q_stride_t, q_stride_h, k_stride_t, k_stride_h, cos, sin,
    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, ROT_HALF: tl.constexpr,
    HALF_PAD: tl.constexpr, IS_NEOX: tl.constexpr, BLOCK_H: tl.constexpr,
    HEAD_SPLIT: tl.constexpr, SKIP_FIRST: tl.constexpr,
):  # fmt: skip
    """Program ``pid_h``'s head blocks as today's kernel walks them: every ``HEAD_SPLIT``-th of
    q's blocks then k's, from ``pid_h``; without its first block when ``SKIP_FIRST``."""
    q_blocks = tl.cdiv(NUM_Q_HEADS, BLOCK_H)
    q_first = pid_h
    if SKIP_FIRST:
        q_first += HEAD_SPLIT
    for hb in range(q_first, q_blocks, HEAD_SPLIT):
        _rotate(
            q_ptr, t, t_mask, hb * BLOCK_H, q_stride_t, q_stride_h, cos, sin, NUM_Q_HEADS,
            ROT_HALF, HALF_PAD, IS_NEOX, BLOCK_H,
        )  # fmt: skip
    k_first = (pid_h + HEAD_SPLIT - q_blocks % HEAD_SPLIT) % HEAD_SPLIT
    if SKIP_FIRST:
        k_first += tl.where(pid_h < q_blocks, 0, HEAD_SPLIT)
    for hb in range(k_first, tl.cdiv(NUM_K_HEADS, BLOCK_H), HEAD_SPLIT):
        _rotate(
            k_ptr, t, t_mask, hb * BLOCK_H, k_stride_t, k_stride_h, cos, sin, NUM_K_HEADS,
            ROT_HALF, HALF_PAD, IS_NEOX, BLOCK_H,
        )  # fmt: skip


@triton.jit(do_not_specialize=["num_tokens"])
def early_rope_kernel(
    pos_ptr, q_ptr, k_ptr, cache_ptr, num_tokens,
    q_stride_t, q_stride_h, k_stride_t, k_stride_h, cache_stride,
    NUM_Q_HEADS: tl.constexpr, ROT_HALF: tl.constexpr, HALF_PAD: tl.constexpr,
    IS_NEOX: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    HEAD_SPLIT: tl.constexpr, NUM_K_HEADS: tl.constexpr,
):  # fmt: skip
    t32, t_mask, t = _tokens(num_tokens, BLOCK_T)
    pid_h = tl.program_id(1)
    q_blocks = tl.cdiv(NUM_Q_HEADS, BLOCK_H)

    # The program's first head block (q's blocks first, then k's): its rows are requested
    # before the positions, so their round trip overlaps the positions' and the cos/sin rows'.
    first_is_q = pid_h < q_blocks
    x_ptr = tl.where(first_is_q, q_ptr, k_ptr)
    stride_t = tl.where(first_is_q, q_stride_t, k_stride_t)
    stride_h = tl.where(first_is_q, q_stride_h, k_stride_h)
    h_start = tl.where(first_is_q, pid_h, pid_h - q_blocks) * BLOCK_H
    num_heads = tl.where(first_is_q, NUM_Q_HEADS, NUM_K_HEADS)
    p, mask = _rows(
        x_ptr, t, t_mask, h_start, stride_t, stride_h, num_heads, ROT_HALF, HALF_PAD, IS_NEOX,
        BLOCK_H,
    )  # fmt: skip
    x1, x2 = _load(p, mask, ROT_HALF, HALF_PAD, IS_NEOX)

    pos = tl.load(pos_ptr + t32, mask=t_mask, other=0).to(tl.int64)
    cos, sin = _cos_sin(cache_ptr, pos, t_mask, cache_stride, ROT_HALF, HALF_PAD)
    _store(p, mask, x1 * cos - x2 * sin, x2 * cos + x1 * sin, ROT_HALF, IS_NEOX)

    _rotate_blocks(
        q_ptr, k_ptr, t, t_mask, pid_h, q_stride_t, q_stride_h, k_stride_t, k_stride_h, cos, sin,
        NUM_Q_HEADS, NUM_K_HEADS, ROT_HALF, HALF_PAD, IS_NEOX, BLOCK_H, HEAD_SPLIT, True,
    )  # fmt: skip


@triton.jit(do_not_specialize=["num_tokens"])
def rows_copy_kernel(
    pos_ptr, q_ptr, k_ptr, cache_ptr, num_tokens,
    q_stride_t, q_stride_h, k_stride_t, k_stride_h, cache_stride,
    NUM_Q_HEADS: tl.constexpr, ROT_HALF: tl.constexpr, HALF_PAD: tl.constexpr,
    IS_NEOX: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    HEAD_SPLIT: tl.constexpr, NUM_K_HEADS: tl.constexpr,
):  # fmt: skip
    """The same rows read and written back, head blocks walked as today: no positions, no
    cos/sin (a floor, not RoPE)."""
    _, t_mask, t = _tokens(num_tokens, BLOCK_T)
    pid_h = tl.program_id(1)
    _rotate_blocks(
        q_ptr, k_ptr, t, t_mask, pid_h, q_stride_t, q_stride_h, k_stride_t, k_stride_h, 1.0, 0.0,
        NUM_Q_HEADS, NUM_K_HEADS, ROT_HALF, HALF_PAD, IS_NEOX, BLOCK_H, HEAD_SPLIT, False,
    )  # fmt: skip


@triton.jit(do_not_specialize=["num_tokens"])
def unchained_kernel(
    pos_ptr, q_ptr, k_ptr, cache_ptr, num_tokens,
    q_stride_t, q_stride_h, k_stride_t, k_stride_h, cache_stride,
    NUM_Q_HEADS: tl.constexpr, ROT_HALF: tl.constexpr, HALF_PAD: tl.constexpr,
    IS_NEOX: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    HEAD_SPLIT: tl.constexpr, NUM_K_HEADS: tl.constexpr,
):  # fmt: skip
    """Today's kernel with the cos/sin rows indexed by the token, not by its position: the same
    loads and arithmetic without the dependent round trip (a floor, not RoPE)."""
    _, t_mask, t = _tokens(num_tokens, BLOCK_T)
    pid_h = tl.program_id(1)
    # The cache has 8192 rows.
    cos, sin = _cos_sin(cache_ptr, t & 4095, t_mask, cache_stride, ROT_HALF, HALF_PAD)
    _rotate_blocks(
        q_ptr, k_ptr, t, t_mask, pid_h, q_stride_t, q_stride_h, k_stride_t, k_stride_h, cos, sin,
        NUM_Q_HEADS, NUM_K_HEADS, ROT_HALF, HALF_PAD, IS_NEOX, BLOCK_H, HEAD_SPLIT, False,
    )  # fmt: skip


@triton.jit(do_not_specialize=["num_tokens"])
def empty_kernel(
    pos_ptr, q_ptr, k_ptr, cache_ptr, num_tokens,
    q_stride_t, q_stride_h, k_stride_t, k_stride_h, cache_stride,
    NUM_Q_HEADS: tl.constexpr, ROT_HALF: tl.constexpr, HALF_PAD: tl.constexpr,
    IS_NEOX: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    HEAD_SPLIT: tl.constexpr, NUM_K_HEADS: tl.constexpr,
):  # fmt: skip
    """The same grid doing nothing (a floor, not RoPE)."""
    pass


KERNELS = {
    "early": early_rope_kernel,
    "unchained": unchained_kernel,
    "rows_copy": rows_copy_kernel,
    "empty": empty_kernel,
}
GATED = ("early",)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--cpu-smoke", action="store_true")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.cpu_smoke:
        device, timing, todo = "cpu", {"repeats": 1, "min_round_s": 0.0}, smoke_cases()
        todo += [Case("tiny NeoX", type(todo[0].spec)(32, 32, 3, 1, True, torch.float32), 3)]
    else:
        device, timing, todo = args.device, {"repeats": args.repeats}, cases()
    rows, ratios = [], []
    for case in todo:
        spec = case.spec
        ours = selector_for(spec, device)
        choice = ours.explain(case.tokens, has_key=case.with_key)
        if args.cpu_smoke:  # the CPU selector runs torch: walk configs with 1-4 blocks each
            configs = [
                dict(block_t=bt, block_h=bh, head_split=split, num_warps=1, num_stages=1)
                for bt, bh, split in ((2, 1, 2), (1, 2, 1), (2, 2, 4), (1, 1, 128))
            ]
            for config in configs:
                fn = TritonLauncher(spec, config, kernel=early_rope_kernel)
                check_correct(fn, spec, case.tokens, device, keyless=not case.with_key, seed=1)
            ours = TritonLauncher(spec, configs[0])
            choice = dataclasses.replace(choice, provider="triton", config=configs[0])
        if choice.provider != "triton":
            print(f"{case.model[:24]:24} {case.tokens:6d} runs {choice.provider}: skipped")
            continue
        kw = dict(with_key=case.with_key, **timing)
        row = {"model": case.model, "spec": spec.key, "key": case.with_key,
               "tokens": case.tokens, "config": str(dict(choice.config))}  # fmt: skip
        row["today_us"] = time_rope(ours, spec, case.tokens, device, **kw).median_us
        for name, kernel in KERNELS.items():
            fn = TritonLauncher(spec, dict(choice.config), kernel=kernel)
            if name in GATED:
                check_correct(fn, spec, case.tokens, device, keyless=not case.with_key, seed=1)
            row[f"{name}_us"] = time_rope(fn, spec, case.tokens, device, **kw).median_us
        rows.append(row)
        ratios.append(row["today_us"] / row["early_us"])
        print(
            f"{case.model[:24]:24} {case.tokens:6d} today {row['today_us']:7.2f} early "
            f"{row['early_us']:7.2f} ({ratios[-1]:.3f}x) unchained {row['unchained_us']:7.2f} "
            f"rows copy {row['rows_copy_us']:7.2f} "
            f"empty {row['empty_us']:6.2f}  {row['config']}",
            flush=True,
        )
        if args.out:
            write_csv(args.out, rows)
    print(
        f"early over today's kernel, same configs: geomean {geomean(ratios):.3f}x "
        f"over {len(ratios)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
