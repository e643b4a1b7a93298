"""Experiment: does a persistent, software-pipelined RoPE kernel beat today's one-shot grid at
mid token counts?

Today's kernel starts one program per (token block, head block share) and each program walks
two dependent memory round trips (positions, then the cos/sin rows they index) before its
stores. Between 129 and 12000 tokens the tuned kernel runs 2.7-3.2 us above what its streaming
bandwidth predicts (unseen-shape runs). This variant starts a few programs per SM that loop over
work items (``BLOCK_T`` tokens by ``BLOCK_H`` heads of q or of k, q's first), keeping the
positions two items ahead and the cos/sin rows one item ahead in registers, and, with
``PREFETCH_X``, the next item's q or k rows too, so that each program has loads in flight
while it computes and stores.

NeoX style only (35 of the 38 unseen cases). Every config is checked against the float64
reference before it is timed; each case prints today's selection, the best streaming config,
and the faster of FlashInfer and vLLM.

    python benchmarks/experiments/streaming_kernel.py --device cuda:0 --out $OUT/streaming.csv
    TRITON_INTERPRET=1 python benchmarks/experiments/streaming_kernel.py --cpu-smoke
"""

from __future__ import annotations

import argparse
import csv
import itertools
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unseen_shapes import cases, geomean, selector_for

from kernels import RopeSpec, get_provider
from kernels.measure import check_correct, time_rope
from kernels.providers import TritonGeometry


@triton.jit
def _tokens(item, num_tokens, HEAD_BLOCKS: tl.constexpr, BLOCK_T: tl.constexpr):
    t = (item // HEAD_BLOCKS) * BLOCK_T + tl.arange(0, BLOCK_T)
    return t.to(tl.int64), t < num_tokens


@triton.jit
def _cos_sin(cache_ptr, pos, t_mask, cache_stride, ROT_HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    d = tl.arange(0, HALF_PAD)
    mask = t_mask[:, None] & (d < ROT_HALF)[None, :]
    row = cache_ptr + pos[:, None] * cache_stride + d[None, :]
    return tl.load(row, mask=mask, other=0.0), tl.load(row + ROT_HALF, mask=mask, other=0.0)


@triton.jit
def _load_rows(
    item, num_tokens, q_ptr, k_ptr, q_stride_t, q_stride_h, k_stride_t, k_stride_h,
    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, Q_BLOCKS: tl.constexpr,
    HEAD_BLOCKS: tl.constexpr, ROT_HALF: tl.constexpr, HALF_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """Pointers to the first halves of ``item``'s rows, their mask, and both halves loaded."""
    t, t_mask = _tokens(item, num_tokens, HEAD_BLOCKS, BLOCK_T)
    hb = item % HEAD_BLOCKS
    is_q = hb < Q_BLOCKS
    base = tl.where(is_q, q_ptr, k_ptr)
    stride_t = tl.where(is_q, q_stride_t, k_stride_t)
    stride_h = tl.where(is_q, q_stride_h, k_stride_h)
    heads = tl.where(is_q, NUM_Q_HEADS, NUM_K_HEADS)
    h = tl.where(is_q, hb, hb - Q_BLOCKS) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, HALF_PAD)
    p = base + t[:, None, None] * stride_t + h[None, :, None] * stride_h + d[None, None, :]
    mask = t_mask[:, None, None] & (h < heads)[None, :, None] & (d < ROT_HALF)[None, None, :]
    return p, mask, tl.load(p, mask=mask), tl.load(p + ROT_HALF, mask=mask)


@triton.jit(do_not_specialize=["num_tokens"])
def streaming_rope_kernel(
    pos_ptr, q_ptr, k_ptr, cache_ptr, num_tokens,
    q_stride_t, q_stride_h, k_stride_t, k_stride_h, cache_stride,
    NUM_Q_HEADS: tl.constexpr,  # Hq
    NUM_K_HEADS: tl.constexpr,  # Hk (0: no key)
    ROT_HALF: tl.constexpr,  # rotary_dim // 2
    HALF_PAD: tl.constexpr,  # ROT_HALF rounded up to a power of two
    BLOCK_T: tl.constexpr,  # tokens per work item
    BLOCK_H: tl.constexpr,  # heads (all of q or all of k) per work item
    PREFETCH_X: tl.constexpr,  # load the next item's rows before storing this one's
):  # fmt: skip
    Q_BLOCKS: tl.constexpr = (NUM_Q_HEADS + BLOCK_H - 1) // BLOCK_H
    HEAD_BLOCKS: tl.constexpr = Q_BLOCKS + (NUM_K_HEADS + BLOCK_H - 1) // BLOCK_H
    step = tl.num_programs(0)
    items = tl.cdiv(num_tokens, BLOCK_T) * HEAD_BLOCKS
    first = tl.program_id(0)
    # Items past the last have token indices past num_tokens: the token masks cover them.
    # Positions two items ahead and cos/sin one item ahead (prologue: items 0 and 1).
    t, t_mask = _tokens(first, num_tokens, HEAD_BLOCKS, BLOCK_T)
    pos = tl.load(pos_ptr + t, mask=t_mask, other=0).to(tl.int64)
    cos, sin = _cos_sin(cache_ptr, pos, t_mask, cache_stride, ROT_HALF, HALF_PAD)
    t, t_mask = _tokens(first + step, num_tokens, HEAD_BLOCKS, BLOCK_T)
    pos_next = tl.load(pos_ptr + t, mask=t_mask, other=0).to(tl.int64)
    p, mask, x1, x2 = _load_rows(
        first, num_tokens, q_ptr, k_ptr, q_stride_t, q_stride_h, k_stride_t, k_stride_h,
        NUM_Q_HEADS, NUM_K_HEADS, Q_BLOCKS, HEAD_BLOCKS, ROT_HALF, HALF_PAD, BLOCK_T, BLOCK_H,
    )  # fmt: skip
    for item in range(first, items, step):
        nxt = item + step
        t, t_mask = _tokens(nxt, num_tokens, HEAD_BLOCKS, BLOCK_T)
        cos_next, sin_next = _cos_sin(cache_ptr, pos_next, t_mask, cache_stride, ROT_HALF, HALF_PAD)
        t2, t2_mask = _tokens(nxt + step, num_tokens, HEAD_BLOCKS, BLOCK_T)
        pos_after = tl.load(pos_ptr + t2, mask=t2_mask, other=0)
        if PREFETCH_X:
            p_next, mask_next, x1_next, x2_next = _load_rows(
                nxt, num_tokens, q_ptr, k_ptr, q_stride_t, q_stride_h, k_stride_t, k_stride_h,
                NUM_Q_HEADS, NUM_K_HEADS, Q_BLOCKS, HEAD_BLOCKS, ROT_HALF, HALF_PAD, BLOCK_T,
                BLOCK_H,
            )  # fmt: skip
        c = cos.to(tl.float32)[:, None, :]
        s = sin.to(tl.float32)[:, None, :]
        a = x1.to(tl.float32)
        b = x2.to(tl.float32)
        tl.store(p, (a * c - b * s).to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(p + ROT_HALF, (b * c + a * s).to(q_ptr.dtype.element_ty), mask=mask)
        if not PREFETCH_X:
            p_next, mask_next, x1_next, x2_next = _load_rows(
                nxt, num_tokens, q_ptr, k_ptr, q_stride_t, q_stride_h, k_stride_t, k_stride_h,
                NUM_Q_HEADS, NUM_K_HEADS, Q_BLOCKS, HEAD_BLOCKS, ROT_HALF, HALF_PAD, BLOCK_T,
                BLOCK_H,
            )  # fmt: skip
        p, mask, x1, x2 = p_next, mask_next, x1_next, x2_next
        cos, sin, pos_next = cos_next, sin_next, pos_after.to(tl.int64)


def streaming_fn(spec: RopeSpec, config: dict, num_sms: int):
    """A callable with the RoPE signature launching :func:`streaming_rope_kernel`."""
    per_sm = config["programs_per_sm"]
    # The one-shot kernel's token and head blocks: each is one item here.
    geometries = {
        has_key: TritonGeometry(spec, config["block_t"], config["block_h"], 1, has_key)
        for has_key in (True, False)
    }

    def run(positions, query, key, cos_sin_cache):
        n = positions.numel()
        k_heads = 0 if key is None else key.shape[1] // spec.head_size
        k = query if key is None else key
        geometry = geometries[key is not None]
        items = geometry.token_blocks(n) * geometry.head_blocks
        streaming_rope_kernel[(max(1, min(items, num_sms * per_sm)),)](
            positions, query, k, cos_sin_cache, n,
            query.stride(0), spec.head_size, k.stride(0), spec.head_size, cos_sin_cache.stride(0),
            NUM_Q_HEADS=spec.num_heads, NUM_K_HEADS=k_heads, ROT_HALF=geometry.rot_half,
            HALF_PAD=geometry.half_pad, BLOCK_T=config["block_t"],
            BLOCK_H=config["block_h"], PREFETCH_X=config["prefetch_x"],
            num_warps=config["num_warps"], num_stages=1,
        )  # fmt: skip

    return run


def configs(spec: RopeSpec, args):
    """Streaming configs: items of ``--elements`` rotated elements (padded), over the warps,
    programs per SM and prefetch axes."""
    if args.cpu_smoke:
        axes = ((1, 2), (1, 4), (2,), (1, 2), (False, True))
    else:
        axes = ((1, 2, 4), (1, 2, 4, 8, 16, 32), args.warps, args.per_sm, (False, True))
    for block_t, block_h, warps, per_sm, prefetch in itertools.product(*axes):
        elements = TritonGeometry(spec, block_t, block_h, head_split=1).tile
        if not args.cpu_smoke and elements not in args.elements:
            continue
        if block_h > 2 * triton.next_power_of_2(spec.num_heads):
            continue
        yield {
            "block_t": block_t,
            "block_h": block_h,
            "num_warps": warps,
            "programs_per_sm": per_sm,
            "prefetch_x": prefetch,
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--cpu-smoke", action="store_true")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tokens", default="700,2047,5000,12000", help="unseen cases' counts")
    parser.add_argument("--elements", default="512,1024,2048", help="rotated elements per item")
    parser.add_argument("--warps", default="4,8")
    parser.add_argument("--per-sm", default="4,8,16", help="programs started per SM")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    for name in ("tokens", "elements", "warps", "per_sm"):
        setattr(args, name, tuple(int(v) for v in getattr(args, name).split(",")))
    if args.cpu_smoke:
        device, num_sms, timing = "cpu", 2, {"repeats": 1, "min_round_s": 0.0}
        todo = [c for c in cases() if c.tokens == 3 and c.spec.is_neox][:1]
        todo = [type(c)(c.model, RopeSpec(32, 16, 4, 2, True, torch.float32), 5) for c in todo]
    else:
        device, timing = args.device, {"repeats": args.repeats}
        num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        todo = [c for c in cases() if c.spec.is_neox and c.tokens in args.tokens]
    rows, ratios = [], []
    for case in todo:
        spec = case.spec
        ours = selector_for(spec, device)
        kw = dict(with_key=case.with_key, **timing)
        today = time_rope(ours, spec, case.tokens, device, **kw).median_us
        vendors = {}
        for name in ("flashinfer", "vllm"):
            provider = get_provider(name)
            if provider.unavailable_reason(device) is None and not provider.unsupported_reason(
                spec, has_key=case.with_key
            ):
                fn = provider.callable_for(spec, None)
                vendors[name] = time_rope(fn, spec, case.tokens, device, **kw).median_us
        best = (float("inf"), None)
        for config in configs(spec, args):
            fn = streaming_fn(spec, config, num_sms)
            try:
                check_correct(fn, spec, case.tokens, device, keyless=not case.with_key, seed=1)
                us = time_rope(fn, spec, case.tokens, device, **kw).median_us
            except Exception as exc:  # a failing config is reported, never fatal
                print(f"  {config}: FAILED {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                continue
            rows.append({"model": case.model, "spec": spec.key, "key": case.with_key,
                         "tokens": case.tokens, **config, "us": us, "today_us": today})  # fmt: skip
            best = min(best, (us, str(config)), key=lambda b: b[0])
        vendor = min(vendors.values(), default=float("nan"))
        ratios.append(today / best[0])
        print(
            f"{case.model[:24]:24} {case.tokens:6d} today {today:8.2f}  streaming {best[0]:8.2f} "
            f"({today / best[0]:.3f}x)  vendor {vendor:8.2f}  {best[1]}",
            flush=True,
        )
        if args.out and rows:
            with open(args.out, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
    print(
        f"best streaming over today's selection: geomean {geomean(ratios):.3f}x over {len(ratios)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
